/**
 * The logic service's HTTP API (docs/logic.md; cim/client/logic.py): accounts,
 * bindings, SOS, fences, positions, posts. One method per call, the decoded JSON
 * back, every refusal a LogicError with the service's code (`not_found`, `own_post`...).
 */
import { ServiceError, type Fetch } from "../session/router.js";
import { ServiceApi, segment } from "./http.js";

export const API_ROOT = "/api/v1";

export class LogicError extends ServiceError {
  override name = "LogicError";
}

type Json = Record<string, unknown>;
type Position = { lat: number; lon: number; accuracy_m?: number; at?: string | Date };

function wirePosition(position: Position): Json {
  const at = position.at instanceof Date ? position.at.toISOString() : position.at;
  return { ...position, ...(at === undefined ? {} : { at }) };
}

export class LogicClient {
  private readonly api: ServiceApi;

  /** `baseUrl` is the service's root, e.g. http://127.0.0.1:8081; `token` a router token (none: register only). */
  constructor(baseUrl: string, token?: string | (() => string), fetcher?: Fetch) {
    const base = baseUrl.replace(/\/+$/, "").replace(/\/api\/v1$/, "");
    this.api = new ServiceApi(base + API_ROOT, token, fetcher, LogicError);
  }

  call(method: string, path: string, body?: unknown, query?: Record<string, string | number | undefined>): Promise<Json> {
    return this.api.call(method, path, body, query);
  }

  // --- accounts -----------------------------------------------------------------------
  register(name: string, password: string, kind: "person" | "device" = "person", displayName?: string): Promise<Json> {
    return this.call("POST", "/register", { name, password, kind, ...(displayName ? { display_name: displayName } : {}) });
  }
  me(): Promise<Json> {
    return this.call("GET", "/me");
  }

  // --- bindings (guardians and devices) ------------------------------------------------
  bindingCode(): Promise<Json> {
    return this.call("POST", "/devices/me/binding-code");
  }
  bind(device: string, code: string): Promise<Json> {
    return this.call("POST", "/bindings", { device, code });
  }
  bindings(): Promise<Json> {
    return this.call("GET", "/bindings");
  }
  approveBinding(device: string, guardian: string): Promise<Json> {
    return this.call("POST", `/bindings/${segment(device)}/${segment(guardian)}/approve`);
  }
  unbind(device: string, guardian: string): Promise<Json> {
    return this.call("DELETE", `/bindings/${segment(device)}/${segment(guardian)}`);
  }

  // --- SOS ----------------------------------------------------------------------------
  raiseSos(lat: number, lon: number, fields: { accuracy_m?: number; battery?: number } = {}): Promise<Json> {
    return this.call("POST", "/sos", { lat, lon, ...fields });
  }
  sosEvents(device?: string, limit?: number): Promise<Json> {
    return this.call("GET", "/sos", undefined, { device, limit });
  }
  sosEvent(event: number): Promise<Json> {
    return this.call("GET", `/sos/${segment(event)}`);
  }
  acknowledgeSos(event: number): Promise<Json> {
    return this.call("POST", `/sos/${segment(event)}/ack`);
  }

  // --- fences and positions -----------------------------------------------------------
  addCircleFence(device: string, name: string, lat: number, lon: number, radiusM: number): Promise<Json> {
    return this.call("POST", `/devices/${segment(device)}/fences`, { name, circle: { lat, lon, radius_m: radiusM } });
  }
  addPolygonFence(device: string, name: string, points: [number, number][]): Promise<Json> {
    return this.call("POST", `/devices/${segment(device)}/fences`, { name, polygon: points.map(([lat, lon]) => [lat, lon]) });
  }
  fences(device: string): Promise<Json> {
    return this.call("GET", `/devices/${segment(device)}/fences`);
  }
  deleteFence(device: string, fence: number): Promise<Json> {
    return this.call("DELETE", `/devices/${segment(device)}/fences/${segment(fence)}`);
  }
  reportPositions(positions: Position[]): Promise<Json> {
    return this.call("POST", "/locations", { positions: positions.map(wirePosition) });
  }
  positions(device: string, query: { since?: string; until?: string; limit?: number } = {}): Promise<Json> {
    return this.call("GET", `/devices/${segment(device)}/locations`, undefined, query);
  }

  // --- posts --------------------------------------------------------------------------
  createPost(text: string, fields: { media_url?: string; like_goal?: number; audience?: string } = {}): Promise<Json> {
    return this.call("POST", "/posts", { text, ...fields });
  }
  posts(query: { author?: string; before?: number; limit?: number } = {}): Promise<Json> {
    return this.call("GET", "/posts", undefined, query);
  }
  post(post: number): Promise<Json> {
    return this.call("GET", `/posts/${segment(post)}`);
  }
  deletePost(post: number): Promise<Json> {
    return this.call("DELETE", `/posts/${segment(post)}`);
  }
  like(post: number): Promise<Json> {
    return this.call("PUT", `/posts/${segment(post)}/like`);
  }
  unlike(post: number): Promise<Json> {
    return this.call("DELETE", `/posts/${segment(post)}/like`);
  }
  likers(post: number, limit?: number, offset?: number): Promise<Json> {
    return this.call("GET", `/posts/${segment(post)}/likes`, undefined, { limit, offset });
  }
}
