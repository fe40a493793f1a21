// The HTTP services: chunked resumable uploads with progress, instant upload with a
// proof of possession, the logic API's calls and refusals (fake services in memory).
import assert from "node:assert/strict";
import { createHash, createHmac, randomBytes } from "node:crypto";
import { test } from "node:test";
import { FileClient, FileServiceError, MemoryUploadState, mediaMessage, md5Of, type UploadProgress } from "../src/api/files.js";
import { LogicClient, LogicError } from "../src/api/logic.js";
import { pb } from "../src/protocol/frames.js";

const FILES = "http://files.test";

/** The file service's upload endpoints, in memory, checking what a real one checks. */
class FakeFiles {
  uploads = new Map<string, { name: string; size: number; md5: string; mime: string; chunks: Map<number, Uint8Array> }>();
  stored = new Map<string, Uint8Array>();
  puts: number[] = [];
  corruptOnce = new Set<number>();
  chunkSize = 1000;
  token = "tok";
  inFlight = 0;
  maxInFlight = 0;
  challenge = { token: "ch1", nonce: Buffer.from(randomBytes(16)).toString("base64url"), offset: 10, length: 100 };

  fetch = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    const url = new URL(String(input));
    const method = init?.method ?? "GET";
    const headers = new Headers(init?.headers);
    if (headers.get("Authorization") !== `Bearer ${this.token}`) return json(401, { error: "invalid_token", message: "no" });
    const path = url.pathname;
    if (method === "POST" && path === "/api/v1/files/check") {
      const body = JSON.parse(String(init!.body));
      const md5 = body.md5 as string;
      const have = [...this.stored.values()].find((bytes) => createHash("md5").update(bytes).digest("hex") === md5);
      if (!body.challenge) return json(200, { challenge: this.challenge });
      const expected = have && createHmac("sha256", Buffer.from(this.challenge.nonce, "base64url")).update(have.subarray(10, 110)).digest("hex");
      if (have && body.proof === expected) return json(200, stored("f-instant", have));
      return json(200, { exists: false });
    }
    if (method === "POST" && path === "/api/v1/uploads") {
      const body = JSON.parse(String(init!.body));
      const id = `u${this.uploads.size + 1}`;
      this.uploads.set(id, { ...body, chunks: new Map() });
      return json(201, { upload_id: id, chunk_size: this.chunkSize, chunk_count: Math.ceil(body.size / this.chunkSize), name: body.name });
    }
    const chunkMatch = path.match(/^\/api\/v1\/uploads\/(\w+)\/chunks\/(\d+)$/);
    if (method === "PUT" && chunkMatch) {
      const upload = this.uploads.get(chunkMatch[1]!)!;
      const n = Number(chunkMatch[2]);
      this.inFlight++;
      this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
      await new Promise((resolve) => setImmediate(resolve));
      this.inFlight--;
      let data = new Uint8Array(init!.body as Uint8Array);
      this.puts.push(n);
      if (this.corruptOnce.delete(n)) data = data.map((b) => b ^ 1);
      const md5 = createHash("md5").update(data).digest("base64");
      if (md5 !== headers.get("Content-MD5")) return json(400, { error: "md5_mismatch", message: "chunk damaged" });
      upload.chunks.set(n, data);
      return json(200, { upload_id: chunkMatch[1], chunk: n, received: upload.chunks.size });
    }
    const statusMatch = path.match(/^\/api\/v1\/uploads\/(\w+)$/);
    if (method === "GET" && statusMatch) {
      const upload = this.uploads.get(statusMatch[1]!);
      if (!upload) return json(404, { error: "not_found", message: "no such upload" });
      return json(200, {
        upload_id: statusMatch[1], size: upload.size, chunk_size: this.chunkSize,
        chunk_count: Math.ceil(upload.size / this.chunkSize), received: [...upload.chunks.keys()],
      });
    }
    const completeMatch = path.match(/^\/api\/v1\/uploads\/(\w+)\/complete$/);
    if (method === "POST" && completeMatch) {
      const upload = this.uploads.get(completeMatch[1]!)!;
      const parts = [...upload.chunks.entries()].sort((a, b) => a[0] - b[0]).map(([, d]) => d);
      const whole = Buffer.concat(parts);
      if (createHash("md5").update(whole).digest("hex") !== upload.md5) return json(400, { error: "md5_mismatch", message: "whole file" });
      const id = `f${this.stored.size + 1}`;
      this.stored.set(id, whole);
      return json(200, { ...stored(id, whole), name: upload.name, mime: upload.mime });
    }
    return json(404, { error: "not_found", message: path });
  };
}

function stored(id: string, bytes: Uint8Array) {
  return { exists: true, file_id: id, url: `${FILES}/files/${id}`, size: bytes.length, mime: "image/png", name: "x.png", width: 4, height: 3, md5: createHash("md5").update(bytes).digest("hex") };
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
}

const noWait = async () => {};

test("md5 of a Blob read in slices equals node's", async () => {
  const bytes = randomBytes(3_000_000);
  assert.equal(await md5Of(new Blob([bytes])), createHash("md5").update(bytes).digest("hex"));
});

test("a chunked upload: several chunks in flight, progress to 100 %, a damaged chunk sent again", async () => {
  const files = new FakeFiles();
  files.corruptOnce.add(2);
  const client = new FileClient(FILES, () => "tok", "alice", files.fetch, 4, noWait);
  const bytes = randomBytes(4_500);
  const progress: UploadProgress[] = [];
  const report = await client.upload(new Blob([bytes], { type: "image/png" }), { name: "cat.png", onProgress: (p) => progress.push(p) });
  assert.equal(report.instant, false);
  assert.equal(report.chunkCount, 5);
  assert.equal(report.chunksSent, 5);
  assert.deepEqual(Buffer.from(files.stored.get(report.file.fileId)!), bytes);
  assert.equal(progress.at(-1)!.fraction, 1);
  assert.ok(progress.every((p, i) => i === 0 || p.done >= progress[i - 1]!.done), "progress never goes back");
  assert.equal(files.puts.filter((n) => n === 2).length, 2, "the damaged chunk went twice");
  assert.ok(files.maxInFlight > 1, "chunks are pipelined");
  assert.equal(files.uploads.get("u1")!.mime, "image/png");
});

test("a resumed upload sends only the chunks the server lacks", async () => {
  const files = new FakeFiles();
  const client = new FileClient(FILES, "tok", "alice", files.fetch, 2, noWait);
  const bytes = randomBytes(3_500);
  const md5 = createHash("md5").update(bytes).digest("hex");
  // An earlier run sent chunks 0 and 1, then the page was closed.
  files.uploads.set("u9", { name: "f", size: bytes.length, md5, mime: "application/octet-stream", chunks: new Map([[0, bytes.subarray(0, 1000)], [1, bytes.subarray(1000, 2000)]]) });
  const state = new MemoryUploadState();
  state.put(JSON.stringify([FILES, "alice", md5, bytes.length]), "u9");
  const progress: UploadProgress[] = [];
  const report = await client.upload(bytes, { state, onProgress: (p) => progress.push(p) });
  assert.equal(report.resumed, true);
  assert.deepEqual(files.puts.sort(), [2, 3]);
  assert.equal(progress[0]!.done, 2000, "progress starts at what the server had");
  assert.deepEqual(Buffer.from(files.stored.get(report.file.fileId)!), bytes);
  assert.equal(state.get(JSON.stringify([FILES, "alice", md5, bytes.length])), undefined, "done: forgotten");
});

test("instant upload: the proof of possession over the challenged range", async () => {
  const files = new FakeFiles();
  const bytes = randomBytes(2_000);
  files.stored.set("f-old", bytes);
  const client = new FileClient(FILES, "tok", "alice", files.fetch, 4, noWait);
  const progress: UploadProgress[] = [];
  const report = await client.upload(bytes, { onProgress: (p) => progress.push(p) });
  assert.equal(report.instant, true);
  assert.equal(report.file.fileId, "f-instant");
  assert.deepEqual(files.puts, []);
  assert.equal(progress.at(-1)!.fraction, 1);
});

test("an uploaded image becomes an IMAGE message with its media", () => {
  const init = mediaMessage({ fileId: "f1", url: "u", thumbnailUrl: "t", size: 5, mime: "image/png", name: "a.png", md5: "", width: 4, height: 3, signedUrl: "" });
  assert.equal(init.type, pb.MessageType.IMAGE);
  assert.equal(init.media?.fileId, "f1");
  assert.equal(init.media?.size, 5n);
});

test("a refusal is a FileServiceError with the service's code", async () => {
  const files = new FakeFiles();
  const client = new FileClient(FILES, "wrong", "alice", files.fetch, 4, noWait);
  await assert.rejects(client.upload(randomBytes(10)), (error: unknown) => {
    assert.ok(error instanceof FileServiceError);
    assert.equal(error.status, 401);
    assert.equal(error.code, "invalid_token");
    return true;
  });
});

test("logic calls: paths, bodies, the token; refusals carry the code", async () => {
  const calls: { method: string; url: string; body: unknown; auth: string | null }[] = [];
  const fetcher = async (input: string | URL | Request, init?: RequestInit) => {
    calls.push({ method: init?.method ?? "GET", url: String(input), body: init?.body ? JSON.parse(String(init.body)) : undefined, auth: new Headers(init?.headers).get("Authorization") });
    if (String(input).includes("/posts/7/like")) return json(409, { error: "own_post", message: "you cannot like your own post" });
    return json(200, { ok: true });
  };
  const logic = new LogicClient("http://logic.test/", "tok", fetcher);
  await logic.register("alice", "pw");
  await logic.acknowledgeSos(12);
  await logic.addCircleFence("kid/watch", "school", 52.5, 13.4, 200);
  await logic.sosEvents("kid", 5);
  await assert.rejects(logic.like(7), (error: unknown) => error instanceof LogicError && error.code === "own_post" && error.status === 409);
  assert.deepEqual(calls.map((c) => `${c.method} ${c.url}`), [
    "POST http://logic.test/api/v1/register",
    "POST http://logic.test/api/v1/sos/12/ack",
    "POST http://logic.test/api/v1/devices/kid%2Fwatch/fences",
    "GET http://logic.test/api/v1/sos?device=kid&limit=5",
    "PUT http://logic.test/api/v1/posts/7/like",
  ]);
  assert.deepEqual(calls[0]!.body, { name: "alice", password: "pw", kind: "person" });
  assert.deepEqual(calls[2]!.body, { name: "school", circle: { lat: 52.5, lon: 13.4, radius_m: 200 } });
  assert.equal(calls[1]!.auth, "Bearer tok");
});
