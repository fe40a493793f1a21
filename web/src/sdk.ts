/**
 * The SDK as the app uses it: ChatClient (clients/js) plus the two things the page
 * needs that it does not tell yet — the moment the node took a sent message (msg:A,
 * for the "sent" mark and its place) and the client_seq of a message as it is sent
 * (so the page's item can be matched to its outcome).
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { ChatClient, pb, type DeliveryOutcome } from "../../clients/js/src/index.js";

export { pb, ChatClient };
export type { DeliveryOutcome };
export { ServiceError, conversationKey, mediaMessage, webDeviceName } from "../../clients/js/src/index.js";

export class WebChat extends ChatClient {
  /** msg:A arrived for one of our messages. */
  onTaken: (answer: pb.MsgA) => void = () => {};

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
