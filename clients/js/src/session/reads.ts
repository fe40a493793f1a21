/**
 * Read marks as one device sees them (cim/client/reads.py): unread counts per
 * conversation, the user's own read point (moved by any of its devices), and how far a
 * 1:1 peer has read (✓✓).
 *
 * A conversation's unread count is the newest seq this device knows of minus the user's
 * read point: the highest of this device's `markRead` (READ_A), another device's READ_N,
 * and what the catch-up summary said was read there (its `count` is past max(device
 * cursor, read mark), so `last_seq - count` is that point). A message the user sent,
 * from this device (msg:A) or another one (a msg:N from the user), moves the read point
 * too: nobody has unread messages of their own. Every mark only rises.
 *
 * Nothing here talks to the node; `ChatClient` feeds it frames and asks it numbers, and
 * hears of every count that changed through `onUnread` (the `unread` event).
 */
import { pb } from "../protocol/frames.js";

/** A READ_N as the application hears it (the `read` event). */
export interface ReadEvent {
  conversation: string;
  /** Whose mark moved: the user itself (another device) or the 1:1 peer. */
  reader: string;
  /** Read up to here. */
  seq: bigint;
  /** True: the user read on another device (the unread count dropped); false: the peer read the user's messages up to `seq`. */
  own: boolean;
  /** This device's unread count in the conversation after it. */
  unread: number;
  peer: string;
  group: string;
}

/** A conversation's unread count changed (the `unread` event). */
export interface UnreadChange {
  conversation: string;
  unread: number;
}

/** `name` with '%' and ':' escaped, as cim/history/store.py's `_escape`. */
function escape(name: string): string {
  return name.replaceAll("%", "%25").replaceAll(":", "%3A");
}

/**
 * The timeline key (`Message.conversation`) of what a person names: a key as it is
 * ("d:..." or "g:..."), a group id with `group`, else the 1:1 of `user` with that user.
 */
export function conversationKey(user: string, name: string, group = false): string {
  if (group) return `g:${name}`;
  if (name.startsWith("d:") || name.startsWith("g:")) return name;
  const [first, second] = byCodePoint(user, name) <= 0 ? [user, name] : [name, user];
  return `d:${escape(first)}:${escape(second)}`;
}

/** Python's order of strings (by code point; JS's `<` compares UTF-16 units). */
function byCodePoint(a: string, b: string): number {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i]!.codePointAt(0)! - y[i]!.codePointAt(0)!;
    if (d) return d;
  }
  return x.length - y.length;
}

export class ReadState {
  private readonly newestSeq = new Map<string, bigint>();
  private readonly readSeq = new Map<string, bigint>();
  private readonly peerReadSeq = new Map<string, bigint>();
  /** conversation -> [peer, group], for the application's names. */
  private readonly places = new Map<string, [string, string]>();
  /** Told each conversation whose unread count changed. */
  onUnread: (change: UnreadChange) => void = () => {};

  constructor(readonly user: string) {}

  // --- what the node said -------------------------------------------------------------

  /** The catch-up summary: read points from the counts, the peers' marks. */
  summary(summary: pb.OfflineSummaryA): void {
    for (const entry of summary.conversations) {
      this.places.set(entry.conversation, [entry.peer, entry.group]);
      this.changing(entry.conversation, () => {
        raise(this.newestSeq, entry.conversation, entry.lastSeq);
        raise(this.readSeq, entry.conversation, entry.lastSeq - BigInt(entry.count));
        raise(this.readSeq, entry.conversation, entry.readSeq);
      });
      raise(this.peerReadSeq, entry.conversation, entry.peerReadSeq);
    }
    for (const mark of summary.caughtUp) {
      this.changing(mark.conversation, () => {
        raise(this.newestSeq, mark.conversation, mark.seq);
        raise(this.readSeq, mark.conversation, mark.seq);
      });
    }
    for (const mark of summary.peerReads) raise(this.peerReadSeq, mark.conversation, mark.seq);
  }

  /** A message handed to the application (live or caught up). */
  received(message: pb.Message): void {
    if (!message.conversation || !message.seq) return;
    const mine = message.from === this.user;
    if (!this.places.has(message.conversation)) {
      this.places.set(message.conversation, message.group ? ["", message.group] : [mine ? message.to : message.from, ""]);
    }
    this.changing(message.conversation, () => {
      raise(this.newestSeq, message.conversation, message.seq);
      if (mine) raise(this.readSeq, message.conversation, message.seq);
    });
  }

  /** msg:A (or CHANGE_A): this device's own entry took `seq`. */
  sent(conversation: string, seq: bigint): void {
    if (!conversation || !seq) return;
    this.changing(conversation, () => {
      raise(this.newestSeq, conversation, seq);
      raise(this.readSeq, conversation, seq);
    });
  }

  /** READ_A: the user's mark in effect. */
  marked(answer: pb.ReadA): void {
    this.changing(answer.conversation, () => {
      raise(this.newestSeq, answer.conversation, answer.lastSeq);
      raise(this.readSeq, answer.conversation, answer.seq);
    });
  }

  /** READ_N: the user's other device, or the 1:1 peer, read up to a seq. */
  notice(notice: pb.ReadNotice): ReadEvent {
    const own = notice.reader === this.user;
    if (own) {
      this.changing(notice.conversation, () => {
        raise(this.newestSeq, notice.conversation, notice.lastSeq);
        raise(this.readSeq, notice.conversation, notice.seq);
      });
    } else {
      raise(this.peerReadSeq, notice.conversation, notice.seq);
    }
    if ((notice.peer || notice.group) && !this.places.has(notice.conversation)) {
      this.places.set(notice.conversation, [notice.peer, notice.group]);
    }
    const [peer, group] = this.where(notice.conversation);
    return {
      conversation: notice.conversation,
      reader: notice.reader,
      seq: notice.seq,
      own,
      unread: this.unread(notice.conversation),
      peer,
      group,
    };
  }

  // --- what the application asks ------------------------------------------------------

  /** The newest seq this device knows of in the conversation (0n: none). */
  newest(conversation: string): bigint {
    return this.newestSeq.get(conversation) ?? 0n;
  }

  /** The user's read point in the conversation (0n: nothing read). */
  readUpTo(conversation: string): bigint {
    return this.readSeq.get(conversation) ?? 0n;
  }

  unread(conversation: string): number {
    const count = this.newest(conversation) - this.readUpTo(conversation);
    return count > 0n ? Number(count) : 0;
  }

  /** Every conversation with unread messages, and how many. */
  unreadCounts(): Map<string, number> {
    const counts = new Map<string, number>();
    for (const conversation of this.newestSeq.keys()) {
      const count = this.unread(conversation);
      if (count) counts.set(conversation, count);
    }
    return counts;
  }

  /** The sum of the unread counts (a badge). */
  get totalUnread(): number {
    let total = 0;
    for (const count of this.unreadCounts().values()) total += count;
    return total;
  }

  /** How far the 1:1 peer has read (0n: nothing shown): messages up to it get ✓✓. */
  peerRead(conversation: string): bigint {
    return this.peerReadSeq.get(conversation) ?? 0n;
  }

  /** [peer, group] of a conversation this device has seen, else ["", ""]. */
  where(conversation: string): [string, string] {
    return this.places.get(conversation) ?? ["", ""];
  }

  /** Run `change` and tell `onUnread` if the conversation's count moved. */
  private changing(conversation: string, change: () => void): void {
    const before = this.unread(conversation);
    change();
    const after = this.unread(conversation);
    if (after !== before) {
      try {
        this.onUnread({ conversation, unread: after });
      } catch (error) {
        console.error("cim: the unread listener threw", error);
      }
    }
  }
}

function raise(marks: Map<string, bigint>, conversation: string, seq: bigint): void {
  if (seq > (marks.get(conversation) ?? 0n)) marks.set(conversation, seq);
}
