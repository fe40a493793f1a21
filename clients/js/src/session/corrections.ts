/**
 * Recall and edit as the application sees them (cim/client/corrections.py; #15).
 *
 * A change reaches a device as a timeline entry (a Message with `change` set: live as
 * msg:N or in a catch-up page), in its conversation's order like any message; the
 * session turns it into a `Change` (the `change` event). A change this device made
 * comes back as CHANGE_A and is returned by `recall`/`edit`. `Corrections` remembers the
 * last messages handed over and applies each change to the one it names, so the
 * application gets the message as it now reads (recalled: no text, media or location).
 */
import { pb } from "../protocol/frames.js";

export type ChangeEvent = "recall" | "edit";

export interface Change {
  event: ChangeEvent;
  /** The changed message. */
  msgId: bigint;
  conversation: string;
  /** The changed message's place in the conversation. */
  seq: bigint;
  by: string;
  /** An edit's new text ("" for a recall). */
  text: string;
  atMs: bigint;
  /** The change entry's own id and place. */
  entryId: bigint;
  entrySeq: bigint;
  /** The changed message as it now reads, when this device remembers it. */
  message?: pb.Message;
}

export const EVENTS = new Map<number, ChangeEvent>([
  [pb.ChangeKind.RECALL, "recall"],
  [pb.ChangeKind.EDIT, "edit"],
]);

/** The change a timeline entry carries, or undefined for a message. */
export function changeOf(entry: pb.Message): Change | undefined {
  const event = EVENTS.get(entry.change);
  if (event === undefined) return undefined;
  return {
    event,
    msgId: entry.replaces,
    conversation: entry.conversation,
    seq: entry.replacesSeq,
    by: entry.from,
    text: entry.change === pb.ChangeKind.EDIT ? entry.text : "",
    atMs: entry.changedAtMs || entry.sentAtMs,
    entryId: entry.id,
    entrySeq: entry.seq,
  };
}

export class Corrections {
  private readonly messages = new Map<bigint, pb.Message>();

  constructor(readonly size = 2000) {}

  get(msgId: bigint): pb.Message | undefined {
    return this.messages.get(msgId);
  }

  remember(message: pb.Message): void {
    this.messages.delete(message.id);
    this.messages.set(message.id, message);
    while (this.messages.size > this.size) this.messages.delete(this.messages.keys().next().value!);
  }

  /** Apply `change` to the message it names, if remembered (of its own conversation only). */
  apply(change: Change): Change {
    const message = this.messages.get(change.msgId);
    if (message === undefined || message.conversation !== change.conversation) return change;
    if (change.event === "recall") {
      message.text = "";
      message.media = undefined;
      message.location = undefined;
      message.edited = false;
      message.recalled = true;
      message.changedBy = change.by;
    } else if (!message.recalled) {
      message.text = change.text;
      message.edited = true;
    }
    message.changedAtMs = change.atMs;
    return { ...change, message };
  }
}
