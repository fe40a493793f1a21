/**
 * The logic service's system messages (from `@system`, type SYSTEM, text a JSON
 * object: cim/logic/notices.py, docs/logic.md). The app shows each as a notice; an
 * SOS (`sos.raised`, priority high) as an alarm its guardian acknowledges.
 */

export interface Notice {
  event: string;
  priority: "high" | "normal";
  /** The SOS id, for `sos.raised` / `sos.handled`. */
  sos: number | undefined;
  device: string;
  /** One line for people. */
  summary: string;
  fields: Record<string, unknown>;
}

const DESCRIPTIONS: Record<string, (f: Record<string, unknown>) => string> = {
  "sos.raised": (f) => `SOS from ${str(f["device"])}${place(f)}${battery(f)}`,
  "sos.handled": (f) => `SOS of ${str(f["device"])} handled by ${str(f["handled_by"])}`,
  "contact.requested": (f) => `${str(f["from"])} asks to be a contact of ${str(f["to"])}`,
  "contact.added": (f) => `${str(f["contact"])} and ${str(f["account"])} are contacts`,
  "binding.requested": (f) => `${str(f["guardian"])} asks to be a guardian of ${str(f["device"])}`,
  "group.invited": (f) => `${str(f["invited_by"])} invites you to the group ${str(f["name"] ?? f["group"])}`,
  "fence.crossed": (f) => `${str(f["device"])} ${str(f["direction"]) || "crossed"} ${str(f["fence_name"] ?? f["fence"])}`,
};

function str(value: unknown): string {
  return value === undefined || value === null ? "" : String(value);
}

function place(f: Record<string, unknown>): string {
  const lat = Number(f["lat"]);
  const lon = Number(f["lon"]);
  return Number.isFinite(lat) && Number.isFinite(lon) && f["lat"] !== undefined ? ` at ${lat.toFixed(5)}, ${lon.toFixed(5)}` : "";
}

function battery(f: Record<string, unknown>): string {
  return f["battery"] === undefined ? "" : ` (battery ${str(f["battery"])}%)`;
}

/** The notice in a system message's text; a text that is not a notice is shown as is. */
export function parseNotice(text: string): Notice {
  let fields: Record<string, unknown> = {};
  try {
    const parsed: unknown = JSON.parse(text);
    if (parsed !== null && typeof parsed === "object" && !Array.isArray(parsed)) fields = parsed as Record<string, unknown>;
  } catch {
    fields = {};
  }
  const event = typeof fields["event"] === "string" ? fields["event"] : "";
  if (!event) return { event: "", priority: "normal", sos: undefined, device: "", summary: text, fields };
  const describe = DESCRIPTIONS[event];
  const sosId = Number(fields["sos"]);
  return {
    event,
    priority: fields["priority"] === "high" ? "high" : "normal",
    sos: event.startsWith("sos.") && Number.isInteger(sosId) && sosId > 0 ? sosId : undefined,
    device: str(fields["device"]),
    summary: describe !== undefined ? describe(fields) : event.replace(/[._]/g, " "),
    fields,
  };
}
