/**
 * The file service (docs/protocol.md "The file service"; cim/client/files.py):
 * instant upload with a proof of possession (闪电上传), else chunked, resumable uploads
 * (分块上传, 断点续传) with several chunks in flight, each with its Content-MD5, and
 * progress callbacks for the application's progress bar.
 *
 * MD5 comes from @noble/hashes' legacy module (WebCrypto has none), computed
 * incrementally so a large file is never read whole into memory. The upload id is
 * kept in an `UploadStateStore` (memory by default; an app may back it with
 * localStorage) so a reloaded page resumes with only the chunks the server lacks.
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { hmac } from "@noble/hashes/hmac.js";
import { md5 } from "@noble/hashes/legacy.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { fromBase64, toBase64, toHex } from "../protocol/bytes.js";
import { pb } from "../protocol/frames.js";
import { ServiceError, type Fetch } from "../session/router.js";
import { ServiceApi, segment } from "./http.js";

export class FileServiceError extends ServiceError {
  override name = "FileServiceError";
}

export interface StoredFile {
  fileId: string;
  /** What messages carry (read with a token). */
  url: string;
  thumbnailUrl: string;
  size: number;
  mime: string;
  name: string;
  md5: string;
  width: number;
  height: number;
  signedUrl: string;
}

export interface UploadProgress {
  /** Bytes the server has (including chunks it had before a resume). */
  done: number;
  total: number;
  /** 0..1 */
  fraction: number;
}

export interface UploadReport {
  file: StoredFile;
  instant: boolean;
  resumed: boolean;
  chunksSent: number;
  chunkCount: number;
}

/** Bytes to upload: a Blob (a browser File) or bytes in memory. */
export type UploadSource = Blob | Uint8Array;

export interface UploadStateStore {
  get(key: string): string | undefined;
  put(key: string, uploadId: string): void;
  drop(key: string): void;
}

export class MemoryUploadState implements UploadStateStore {
  private readonly ids = new Map<string, string>();
  get(key: string): string | undefined {
    return this.ids.get(key);
  }
  put(key: string, uploadId: string): void {
    this.ids.set(key, uploadId);
  }
  drop(key: string): void {
    this.ids.delete(key);
  }
}

export interface UploadOptions {
  name?: string;
  mime?: string;
  onProgress?: (progress: UploadProgress) => void;
  state?: UploadStateStore;
}

export const CHUNK_ATTEMPTS = 4;
const RETRYABLE_CODES = new Set(["md5_mismatch", "internal_error", "state_unavailable"]);
const HASH_SLICE = 1 << 20;

async function read(source: UploadSource, offset: number, length: number): Promise<Uint8Array> {
  if (source instanceof Uint8Array) return source.subarray(offset, offset + length);
  return new Uint8Array(await source.slice(offset, offset + length).arrayBuffer());
}

function sizeOf(source: UploadSource): number {
  return source instanceof Uint8Array ? source.length : source.size;
}

/** The hex MD5 of a whole source, read a slice at a time. */
export async function md5Of(source: UploadSource): Promise<string> {
  const hash = md5.create();
  const size = sizeOf(source);
  for (let offset = 0; offset < size; offset += HASH_SLICE) {
    hash.update(await read(source, offset, Math.min(HASH_SLICE, size - offset)));
  }
  return toHex(hash.digest());
}

/** The instant-upload proof: hex HMAC-SHA256(key = the nonce, the named range). */
export function proofOf(nonce: string, data: Uint8Array): string {
  return toHex(hmac(sha256, fromBase64(nonce), data));
}

function storedFile(body: Record<string, unknown>): StoredFile {
  if (typeof body["file_id"] !== "string" || typeof body["url"] !== "string") {
    throw new FileServiceError(0, "bad_response", "the file service's answer names no file");
  }
  return {
    fileId: body["file_id"],
    url: body["url"],
    thumbnailUrl: String(body["thumbnail_url"] ?? ""),
    size: Number(body["size"] ?? 0),
    mime: String(body["mime"] ?? "application/octet-stream"),
    name: String(body["name"] ?? ""),
    md5: String(body["md5"] ?? ""),
    width: Number(body["width"] ?? 0),
    height: Number(body["height"] ?? 0),
    signedUrl: String(body["signed_url"] ?? ""),
  };
}

/** The message that sends an uploaded file: IMAGE, VOICE or FILE by its MIME type. */
export function mediaMessage(file: StoredFile, durationMs = 0): MessageInitShape<typeof pb.MessageSchema> {
  const type = file.mime.startsWith("image/")
    ? pb.MessageType.IMAGE
    : file.mime.startsWith("audio/")
      ? pb.MessageType.VOICE
      : pb.MessageType.FILE;
  return {
    type,
    media: {
      url: file.url,
      thumbnailUrl: file.thumbnailUrl,
      size: BigInt(file.size),
      mime: file.mime,
      name: file.name,
      width: file.width,
      height: file.height,
      fileId: file.fileId,
      durationMs,
    },
  };
}

export class FileClient {
  private readonly api: ServiceApi;

  /** `baseUrl`: the file service's root, e.g. http://127.0.0.1:8082. */
  constructor(
    readonly baseUrl: string,
    token: string | (() => string),
    private readonly user = "",
    private readonly fetcher: Fetch = (...args) => globalThis.fetch(...args),
    readonly parallel = 4,
    private readonly wait: (ms: number) => Promise<void> = (ms) => new Promise((r) => setTimeout(r, ms)),
  ) {
    this.api = new ServiceApi(baseUrl, token, fetcher, FileServiceError);
  }

  /** The stored file if the caller holds the content, else the challenge, else undefined. */
  async check(md5Hex: string, size: number): Promise<StoredFile | { token: string; nonce: string; offset: number; length: number } | undefined> {
    const body = await this.api.call("POST", "/api/v1/files/check", { md5: md5Hex, size });
    if (body["exists"]) return storedFile(body);
    const challenge = body["challenge"] as Record<string, unknown> | undefined;
    if (challenge) {
      return {
        token: String(challenge["token"]),
        nonce: String(challenge["nonce"]),
        offset: Number(challenge["offset"]),
        length: Number(challenge["length"]),
      };
    }
    return undefined;
  }

  /** Instant upload: the stored file if the server has the content, else undefined. */
  async instant(source: UploadSource, md5Hex: string, size: number): Promise<StoredFile | undefined> {
    const answer = await this.check(md5Hex, size);
    if (answer === undefined || "fileId" in answer) return answer;
    const proof = proofOf(answer.nonce, await read(source, answer.offset, answer.length));
    try {
      const body = await this.api.call("POST", "/api/v1/files/check", { md5: md5Hex, size, challenge: answer.token, proof });
      return body["exists"] ? storedFile(body) : undefined;
    } catch (error) {
      if (error instanceof FileServiceError && ["challenge_expired", "bad_challenge"].includes(error.code)) return undefined;
      throw error;
    }
  }

  async describe(fileId: string): Promise<StoredFile> {
    return storedFile(await this.api.call("GET", `/api/v1/files/${segment(fileId)}`));
  }

  delete(fileId: string): Promise<Record<string, unknown>> {
    return this.api.call("DELETE", `/api/v1/files/${segment(fileId)}`);
  }

  createUpload(name: string, size: number, md5Hex: string, mime: string): Promise<Record<string, unknown>> {
    return this.api.call("POST", "/api/v1/uploads", { name, size, md5: md5Hex, mime });
  }

  async uploadStatus(uploadId: string): Promise<Record<string, unknown> | undefined> {
    try {
      return await this.api.call("GET", `/api/v1/uploads/${segment(uploadId)}`);
    } catch (error) {
      if (error instanceof FileServiceError && error.status === 404) return undefined;
      throw error;
    }
  }

  putChunk(uploadId: string, chunk: number, data: Uint8Array): Promise<Record<string, unknown>> {
    return this.api.call("PUT", `/api/v1/uploads/${segment(uploadId)}/chunks/${chunk}`, data.slice(), undefined, {
      "Content-MD5": toBase64(md5(data)),
      "Content-Type": "application/octet-stream",
    });
  }

  async complete(uploadId: string): Promise<StoredFile> {
    return storedFile(await this.api.call("POST", `/api/v1/uploads/${segment(uploadId)}/complete`));
  }

  async abort(uploadId: string): Promise<void> {
    await this.api.call("DELETE", `/api/v1/uploads/${segment(uploadId)}`);
  }

  /** Upload a file: instantly when the server has it, resuming when it can, in chunks otherwise. */
  async upload(source: UploadSource, options: UploadOptions = {}): Promise<UploadReport> {
    const size = sizeOf(source);
    const md5Hex = await md5Of(source);
    const name = options.name ?? (source instanceof Blob && "name" in source ? String(source.name) : "upload");
    const mime = options.mime || (source instanceof Blob && source.type) || "application/octet-stream";
    const report = (done: number) => options.onProgress?.({ done, total: size, fraction: size ? done / size : 1 });
    const instant = await this.instant(source, md5Hex, size);
    if (instant !== undefined) {
      report(size);
      return { file: instant, instant: true, resumed: false, chunksSent: 0, chunkCount: 0 };
    }
    const state = options.state;
    const key = JSON.stringify([this.baseUrl, this.user, md5Hex, size]);
    const known = state?.get(key);
    let status = known ? await this.uploadStatus(known) : undefined;
    const resumed = status !== undefined;
    if (status === undefined) {
      status = await this.createUpload(name, size, md5Hex, mime);
      state?.put(key, String(status["upload_id"]));
    }
    const uploadId = String(status["upload_id"]);
    const chunkSize = Number(status["chunk_size"]);
    const chunkCount = Number(status["chunk_count"]);
    const received = new Set(((status["received"] as number[] | undefined) ?? []).map(Number));
    const missing = [...Array(chunkCount).keys()].filter((n) => !received.has(n));
    let done = [...received].reduce((total, n) => total + Math.min(chunkSize, size - n * chunkSize), 0);
    report(done);
    const progress = (length: number) => report((done += length));
    let file: StoredFile;
    let sent = 0;
    try {
      sent = await this.sendChunks(source, uploadId, size, chunkSize, missing, progress);
      try {
        file = await this.complete(uploadId);
      } catch (error) {
        if (!(error instanceof FileServiceError) || error.code !== "incomplete") throw error;
        // Chunks the server lost: once more.
        const again = ((error.body["missing"] as number[] | undefined) ?? []).map(Number);
        sent += await this.sendChunks(source, uploadId, size, chunkSize, again, () => {});
        file = await this.complete(uploadId);
      }
    } catch (error) {
      if (error instanceof FileServiceError && ["md5_mismatch", "size_mismatch", "not_found"].includes(error.code)) {
        state?.drop(key); // the server discarded the upload: start afresh next time
      }
      throw error;
    }
    state?.drop(key);
    report(size);
    return { file, instant: false, resumed, chunksSent: sent, chunkCount };
  }

  private async sendChunks(
    source: UploadSource,
    uploadId: string,
    size: number,
    chunkSize: number,
    chunks: number[],
    progress: (length: number) => void,
  ): Promise<number> {
    const queue = [...chunks];
    let sent = 0;
    let failure: unknown;
    const worker = async () => {
      while (queue.length && failure === undefined) {
        const chunk = queue.shift()!;
        const offset = chunk * chunkSize;
        const length = Math.min(chunkSize, size - offset);
        try {
          await this.sendOne(source, uploadId, chunk, offset, length);
        } catch (error) {
          failure ??= error;
          return;
        }
        sent++;
        progress(length);
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, this.parallel) }, worker));
    if (failure !== undefined) throw failure;
    return sent;
  }

  private async sendOne(source: UploadSource, uploadId: string, chunk: number, offset: number, length: number): Promise<void> {
    for (let attempt = 0; attempt < CHUNK_ATTEMPTS; attempt++) {
      const data = await read(source, offset, length);
      try {
        await this.putChunk(uploadId, chunk, data);
        return;
      } catch (error) {
        const retryable = error instanceof FileServiceError && (error.status === 0 || RETRYABLE_CODES.has(error.code));
        if (!retryable || attempt === CHUNK_ATTEMPTS - 1) throw error;
      }
      await this.wait(500 * 2 ** attempt);
    }
  }

  /** Download a file the user may read (with the token); the bytes. */
  async download(url: string): Promise<Uint8Array> {
    const absolute = new URL(url, this.baseUrl).toString();
    let response: Response;
    try {
      response = await this.fetcher(absolute, { headers: this.api.headers() });
    } catch (cause) {
      throw new FileServiceError(0, "unreachable", `cannot reach ${absolute}: ${String(cause)}`);
    }
    if (!response.ok) throw new FileServiceError(response.status, "http_error", `HTTP ${response.status}`);
    return new Uint8Array(await response.arrayBuffer());
  }
}
