/**
 * The SDK as the app uses it: ChatClient (clients/js) plus the two things the page
 * needs that it does not tell yet — the moment the node took a sent message (msg:A,
 * for the "sent" mark and its place) and the client_seq of a message as it is sent
 * (so the page's item can be matched to its outcome).
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { ChatClient, pb, type ChatClientOptions, type DeliveryOutcome } from "../../clients/js/src/index.js";

export { pb, ChatClient };
export type { DeliveryOutcome };
export { ServiceError, mediaMessage } from "../../clients/js/src/index.js";

/**
 * The router names the gateway `node.ws_url` (cim/services/router.py); the SDK's
 * parseTicket reads `ws` / `node.ws`. Until it reads both, the login answer is given
 * the name the SDK looks for. (Reported to the SDK's author.)
 */
export const loginFetch: typeof fetch = async (input, init) => {
  const response = await fetch(input, init);
  const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
  if (!response.ok || !url.endsWith("/api/v1/login")) return response;
  const body = (await response.json()) as Record<string, unknown>;
  const node = body["node"] as Record<string, unknown> | undefined;
  if (body["ws"] === undefined && typeof node?.["ws_url"] === "string") body["ws"] = node["ws_url"];
  return new Response(JSON.stringify(body), { status: response.status, headers: response.headers });
};

export class WebChat extends ChatClient {
  /** msg:A arrived for one of our messages. */
  onTaken: (answer: pb.MsgA) => void = () => {};

  constructor(options: ChatClientOptions) {
    super({ fetch: loginFetch, ...options });
  }

  override frame(type: number, message: object): void {
    super.frame(type, message);
    if (type === pb.FrameType.MSG_A) this.onTaken(message as pb.MsgA);
  }

  /** Send, and say at once which client_seq the SDK gave the message (0n if refused). */
  send(init: MessageInitShape<typeof pb.MessageSchema>): { clientSeq: bigint; outcome: Promise<DeliveryOutcome> } {
    const before = new Set(this.outbox.waiting());
    const outcome = this.sendMessage(init);
    const added = this.outbox.waiting().filter((seq) => !before.has(seq));
    return { clientSeq: added.length ? added[added.length - 1]! : 0n, outcome };
  }
}
