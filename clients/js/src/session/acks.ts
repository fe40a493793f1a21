/**
 * Cumulative acknowledgement of group messages (cim/client/acks.py): one ack:R per
 * conversation stands for every message shown there up to its `throughSeq`
 * (docs/protocol.md "Acknowledging cumulatively").
 *
 * A group message costs the node one msg:N per member; an ack:R per member per
 * message would cost it as many frames again. So a group conversation's ack:R waits
 * until `GROUP_ACK_EVERY` of its messages were shown or `GROUP_ACK_DELAY_MS` has
 * passed since the first one not yet acknowledged, and then names the newest
 * (`msgId`) and the watermark (`throughSeq`). An ack that never left (the connection
 * dropped) loses nothing: those messages are past the cursor and come again at
 * catch-up, where the inbox drops them as shown. 1:1 messages are acknowledged at
 * once: their sender waits for "delivered".
 */
import { create } from "@bufbuild/protobuf";
import type { Clock, Timer } from "../clock.js";
import { pb } from "../protocol/frames.js";

/** Group messages shown in one conversation before its ack:R goes at once. */
export const GROUP_ACK_EVERY = 32;
/** Milliseconds a group conversation's ack:R waits at most (within the node's push grace). */
export const GROUP_ACK_DELAY_MS = 500;

const GROUP_PREFIX = "g:";

interface Owed {
  msgId: bigint;
  throughSeq: bigint;
  count: number;
}

export class CumulativeAcks {
  private owedBy = new Map<string, Owed>();
  private timer: Timer | undefined;

  constructor(
    private readonly clock: Clock,
    private readonly send: (ack: pb.AckR) => void,
    private readonly every = GROUP_ACK_EVERY,
    private readonly delayMs = GROUP_ACK_DELAY_MS,
  ) {}

  /** `message` was shown and its conversation is shown up to `throughSeq`. */
  acknowledge(message: pb.Message, throughSeq: bigint): void {
    const conversation = message.conversation;
    if (!conversation.startsWith(GROUP_PREFIX) || throughSeq === 0n || this.delayMs <= 0) {
      // 1:1 (its sender waits for "delivered"), or no watermark to stand for the rest.
      this.send(create(pb.AckRSchema, { msgId: message.id, conversation, throughSeq }));
      return;
    }
    let owed = this.owedBy.get(conversation);
    if (owed === undefined) {
      owed = { msgId: message.id, throughSeq, count: 0 };
      this.owedBy.set(conversation, owed);
    } else {
      owed.msgId = message.id;
      if (throughSeq > owed.throughSeq) owed.throughSeq = throughSeq;
    }
    owed.count += 1;
    if (owed.count >= Math.max(1, this.every)) {
      this.owedBy.delete(conversation);
      this.sendOwed(conversation, owed);
      return;
    }
    this.timer ??= this.clock.later(this.delayMs, () => this.due());
  }

  /** Send every ack owed now (before stopping, say). */
  flush(): void {
    this.timer?.cancel();
    this.due();
  }

  /** The connection is gone: what was owed comes again at catch-up. */
  forget(): void {
    this.timer?.cancel();
    this.timer = undefined;
    this.owedBy.clear();
  }

  /** Conversations with an ack:R waiting. */
  get owed(): number {
    return this.owedBy.size;
  }

  private due(): void {
    this.timer = undefined;
    const owed = this.owedBy;
    this.owedBy = new Map();
    for (const [conversation, entry] of owed) this.sendOwed(conversation, entry);
  }

  private sendOwed(conversation: string, owed: Owed): void {
    this.send(create(pb.AckRSchema, { msgId: owed.msgId, conversation, throughSeq: owed.throughSeq }));
  }
}
