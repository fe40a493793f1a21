/**
 * Where the services are. The daemon serves the app on its own port ([web]); the
 * router, logic and file services listen on theirs (8080, 8081, 8082 in etc/cim.ini).
 * By default the app assumes those ports on the host that served it; `?router=...&
 * logic=...&files=...` in the address, or the login form's "Servers", say otherwise
 * (kept in localStorage for the next visit).
 */

export interface Services {
  router: string;
  logic: string;
  files: string;
}

export const STORAGE_KEY = "cim.services";
const PORTS: Services = { router: "8080", logic: "8081", files: "8082" };

export function defaultServices(location: { protocol: string; hostname: string }): Services {
  const scheme = location.protocol === "https:" ? "https:" : "http:";
  const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname || "127.0.0.1";
  return {
    router: `${scheme}//${host}:${PORTS.router}`,
    logic: `${scheme}//${host}:${PORTS.logic}`,
    files: `${scheme}//${host}:${PORTS.files}`,
  };
}

/** A base URL as typed: http(s) only, no trailing slash; undefined when it is not one. */
export function cleanUrl(raw: string | null | undefined): string | undefined {
  if (!raw) return undefined;
  let url: URL;
  try {
    url = new URL(raw.trim());
  } catch {
    return undefined;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return undefined;
  return url.origin + url.pathname.replace(/\/+$/, "");
}

/** The address's parameters, then what was stored, then the defaults. */
export function resolveServices(
  location: { protocol: string; hostname: string; search: string },
  stored: string | null,
): Services {
  const services = defaultServices(location);
  let saved: Partial<Services> = {};
  try {
    saved = stored ? (JSON.parse(stored) as Partial<Services>) : {};
  } catch {
    saved = {};
  }
  const query = new URLSearchParams(location.search);
  for (const name of ["router", "logic", "files"] as const) {
    services[name] = cleanUrl(query.get(name)) ?? cleanUrl(saved[name]) ?? services[name];
  }
  return services;
}
