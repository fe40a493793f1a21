/**
 * The router over HTTP: login (which node, its key, its WebSocket URL) and logout
 * (cim/client/router.py). Several router URLs: the first that answers is used until
 * it stops answering (design: 本地缓存服务器IP).
 */
import { equalBytes, fromBase64, fromHex } from "../protocol/bytes.js";
import { fingerprintOf } from "../protocol/crypto.js";

/** The router, logic or file service refused (`status` 4xx/5xx) or was unreachable (0). */
export class ServiceError extends Error {
  override name = "ServiceError";
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly body: Record<string, unknown> = {},
  ) {
    super(`${code}: ${message}`);
  }
}

export class RouterError extends ServiceError {
  override name = "RouterError";
}

export interface NodeTarget {
  id: string;
  host: string;
  port: number;
}

/** A successful login. The token is a secret: never log it. */
export interface LoginTicket {
  token: string;
  sessionId: string;
  user: string;
  node: NodeTarget;
  /** The node's WebSocket gateway (`node.ws_url`: its `[ws] advertise`), if it has one. */
  ws: string | undefined;
  serverKey: Uint8Array;
  keyFingerprint: Uint8Array;
  /** ms */
  heartbeatInterval: number;
  /** ms */
  heartbeatTimeout: number;
  cipherSuites: string[];
  /** ms since the epoch (0: unknown) */
  expiresAt: number;
}

/** Check a login answer, including that the key matches its fingerprint. */
export function parseTicket(body: Record<string, unknown>): LoginTicket {
  let ticket: LoginTicket;
  try {
    const node = body["node"] as Record<string, unknown>;
    // The node's gateway, `node.ws_url` in the login answer (absent: no gateway).
    const ws = node["ws_url"] ?? body["ws_url"];
    ticket = {
      token: requireString(body["token"], "token"),
      sessionId: String(body["session_id"] ?? ""),
      user: requireString(body["user"], "user"),
      node: { id: String(node["id"] ?? ""), host: requireString(node["host"], "node.host"), port: Number(node["port"]) },
      ws: typeof ws === "string" && ws ? ws : undefined,
      serverKey: fromBase64(requireString(body["server_key"], "server_key")),
      keyFingerprint: fromHex(requireString(body["key_fingerprint"], "key_fingerprint")),
      heartbeatInterval: Number(body["heartbeat_interval"] ?? 30) * 1000,
      heartbeatTimeout: Number(body["heartbeat_timeout"] ?? 90) * 1000,
      cipherSuites: Array.isArray(body["cipher_suites"]) ? body["cipher_suites"].map(String) : [],
      expiresAt: typeof body["expires_at"] === "string" ? Date.parse(body["expires_at"]) : 0,
    };
  } catch (error) {
    throw new RouterError(0, "bad_response", `the router's login answer is malformed: ${String(error)}`);
  }
  if (!equalBytes(fingerprintOf(ticket.serverKey), ticket.keyFingerprint)) {
    throw new RouterError(0, "bad_key", "the node key does not match its fingerprint");
  }
  return ticket;
}

function requireString(value: unknown, name: string): string {
  if (typeof value !== "string" || !value) throw new TypeError(`${name} is missing`);
  return value;
}

export type Fetch = typeof globalThis.fetch;

/** POST JSON, answer JSON; errors as ServiceError subclasses made by `error`. */
export async function postJson(
  fetcher: Fetch,
  url: string,
  payload: unknown,
  headers: Record<string, string>,
  error: new (status: number, code: string, message: string, body?: Record<string, unknown>) => ServiceError,
  method = "POST",
): Promise<Record<string, unknown>> {
  let response: Response;
  try {
    response = await fetcher(url, {
      method,
      headers: { "Content-Type": "application/json", ...headers },
      ...(payload === undefined ? {} : { body: JSON.stringify(payload) }),
    });
  } catch (cause) {
    throw new error(0, "unreachable", `cannot reach ${url}: ${String(cause)}`);
  }
  return readJson(response, error);
}

export async function readJson(
  response: Response,
  error: new (status: number, code: string, message: string, body?: Record<string, unknown>) => ServiceError,
): Promise<Record<string, unknown>> {
  let body: unknown = {};
  try {
    const text = await response.text();
    body = text ? JSON.parse(text) : {};
  } catch {
    body = {};
  }
  const object = body !== null && typeof body === "object" && !Array.isArray(body) ? (body as Record<string, unknown>) : {};
  if (!response.ok) {
    throw new error(
      response.status,
      String(object["error"] ?? "http_error"),
      String(object["message"] ?? `HTTP ${response.status}`),
      object,
    );
  }
  return object;
}

export class RouterClient {
  private readonly bases: string[];
  private current = 0;

  constructor(
    baseUrls: string | readonly string[],
    private readonly fetcher: Fetch = (...args) => globalThis.fetch(...args),
  ) {
    const urls = typeof baseUrls === "string" ? [baseUrls] : [...baseUrls];
    if (!urls.length) throw new RangeError("at least one router URL is needed");
    this.bases = urls.map((url) => url.replace(/\/+$/, ""));
  }

  get base(): string {
    return this.bases[this.current]!;
  }

  async login(user: string, password: string, device: string): Promise<LoginTicket> {
    return parseTicket(await this.post("/api/v1/login", { user, password, device }));
  }

  async logout(token: string): Promise<void> {
    await this.post("/api/v1/logout", {}, { Authorization: `Bearer ${token}` });
  }

  /** POST to the current router, moving on to the next ones while unreachable. */
  private async post(path: string, payload: unknown, headers: Record<string, string> = {}): Promise<Record<string, unknown>> {
    for (let tried = 0; tried < this.bases.length; tried++) {
      try {
        return await postJson(this.fetcher, this.base + path, payload, headers, RouterError);
      } catch (error) {
        if (!(error instanceof RouterError) || error.code !== "unreachable" || this.bases.length === 1) throw error;
        this.current = (this.current + 1) % this.bases.length;
      }
    }
    throw new RouterError(0, "unreachable", `no router answered (${this.bases.join(", ")})`);
  }
}
