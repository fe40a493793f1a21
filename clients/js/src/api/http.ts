/**
 * One JSON call to a cim HTTP service (logic, files) with the router's token, and
 * its refusal as a ServiceError carrying the service's error code
 * (docs/protocol.md, "JSON conventions"). The token is never logged.
 */
import { ServiceError, readJson, type Fetch } from "../session/router.js";

export class ServiceApi {
  readonly baseUrl: string;

  constructor(
    baseUrl: string,
    private readonly token: string | (() => string) | undefined,
    private readonly fetcher: Fetch = (...args) => globalThis.fetch(...args),
    private readonly error: new (status: number, code: string, message: string, body?: Record<string, unknown>) => ServiceError = ServiceError,
  ) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
  }

  headers(extra: Record<string, string> = {}): Record<string, string> {
    const token = typeof this.token === "function" ? this.token() : this.token;
    return token ? { Authorization: `Bearer ${token}`, ...extra } : { ...extra };
  }

  /** `path` below the service's root; `body` JSON or raw bytes. */
  async call(
    method: string,
    path: string,
    body?: unknown,
    query?: Record<string, string | number | undefined>,
    headers: Record<string, string> = {},
  ): Promise<Record<string, unknown>> {
    let url = this.baseUrl + path;
    const params = Object.entries(query ?? {}).filter(([, v]) => v !== undefined);
    if (params.length) url += "?" + new URLSearchParams(params.map(([k, v]) => [k, String(v)])).toString();
    const raw = body instanceof Uint8Array;
    let response: Response;
    try {
      response = await this.fetcher(url, {
        method,
        headers: this.headers(raw || body === undefined ? headers : { "Content-Type": "application/json", ...headers }),
        ...(body === undefined ? {} : { body: raw ? (body as Uint8Array<ArrayBuffer>) : JSON.stringify(body) }),
      });
    } catch (cause) {
      throw new this.error(0, "unreachable", `cannot reach ${this.baseUrl}: ${String(cause)}`);
    }
    return readJson(response, this.error);
  }
}

/** A name as one path segment: a '/' or '?' in it cannot reach another endpoint. */
export function segment(name: string | number): string {
  return encodeURIComponent(String(name));
}
