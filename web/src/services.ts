/**
 * The HTTP services through the SDK's clients: registering and acknowledging an SOS
 * on the logic service, uploads and authenticated downloads on the file service.
 * The page only adds what a page needs: blob: URLs for <img> and links, since a
 * thumbnail is read with the token and an <img> cannot send one.
 */
import { FileClient, LogicClient, type StoredFile, type UploadProgress } from "../../clients/js/src/index.js";

export type { StoredFile, UploadProgress };

/** POST /api/v1/register: a person's account (no token needed). */
export function register(logic: string, name: string, password: string): Promise<unknown> {
  return new LogicClient(logic).register(name, password, "person");
}

/** A guardian acknowledges a device's SOS (POST /api/v1/sos/{id}/ack). */
export function acknowledgeSos(logic: string, token: () => string, sos: number): Promise<unknown> {
  return new LogicClient(logic, token).acknowledgeSos(sos);
}

export class Files {
  private readonly client: FileClient;
  /** url -> blob: URL, so a thumbnail shown twice is read once. */
  private readonly blobs = new Map<string, Promise<string>>();

  constructor(readonly baseUrl: string, token: () => string, user: string) {
    this.client = new FileClient(baseUrl, token, user);
  }

  async upload(file: File, onProgress: (progress: UploadProgress) => void): Promise<StoredFile> {
    const report = await this.client.upload(file, { name: file.name || "file", mime: file.type, onProgress });
    return report.file;
  }

  /** The address as the page uses it (the service may answer a path). */
  absolute(url: string): string {
    return url ? new URL(url, this.baseUrl).href : "";
  }

  blobUrl(url: string, mime = ""): Promise<string> {
    let blob = this.blobs.get(url);
    if (blob === undefined) {
      blob = this.client.download(this.absolute(url)).then((bytes) => URL.createObjectURL(new Blob([bytes as BlobPart], mime ? { type: mime } : {})));
      blob.catch(() => this.blobs.delete(url));
      this.blobs.set(url, blob);
    }
    return blob;
  }

  forget(): void {
    for (const blob of this.blobs.values()) void blob.then((url) => URL.revokeObjectURL(url)).catch(() => undefined);
    this.blobs.clear();
  }
}
