/**
 * What the app shows, without the DOM: conversations, their messages, unread counts
 * and each sent message's mark. The SDK's events go in (`received`, `sending`,
 * `outcome`, `summary`), the view reads the result; keeping it apart from the page is
 * what lets node --test check it.
 */

/** sending: not yet taken by the node; sent: stored or accepted; delivered: a device of
 * the receiver has it; failed: the SDK gave up. */
import { parseNotice } from "./notices.js";

export type Mark = "sending" | "sent" | "delivered" | "read" | "failed";

export type ItemKind = "text" | "image" | "file" | "system";

export interface MediaInfo {
  url: string;
  thumbnailUrl: string;
  name: string;
  mime: string;
  size: number;
  width: number;
  height: number;
}

/** One message as shown. `key` stays the same from sending to delivered. */
export interface Item {
  key: string;
  msgId: string;
  clientSeq: string;
  from: string;
  mine: boolean;
  /** The user's own message sent from another of their devices: that device's name. */
  via: string;
  kind: ItemKind;
  text: string;
  media: MediaInfo | undefined;
  seq: number;
  at: number;
  mark: Mark | undefined;
  /** Upload progress of a media message being sent, 0..1; undefined once sent. */
  progress: number | undefined;
  recalled: boolean;
  edited: boolean;
}

export interface Conversation {
  /** "user:bob" or "group:g1" (the SDK's outbox key). */
  key: string;
  peer: string;
  group: string;
  title: string;
  unread: number;
  items: Item[];
  lastAt: number;
  /** The newest message's one-line preview (from the summary before any item is here). */
  preview: string;
}

/** The message fields the model reads (a pb.Message fits). */
export interface MessageLike {
  id: bigint;
  from: string;
  to: string;
  group: string;
  type: number;
  text: string;
  clientSeq: bigint;
  sentAtMs: bigint;
  seq: bigint;
  device?: string;
  /** A timeline entry that recalls or edits another message (ChangeKind), not a message. */
  change?: number;
  recalled?: boolean;
  edited?: boolean;
  media?: {
    url: string;
    thumbnailUrl: string;
    name: string;
    mime: string;
    size: bigint;
    width: number;
    height: number;
  };
}

/** The message types of cim.proto (MessageType). */
export const TYPE = { TEXT: 0, IMAGE: 1, VOICE: 2, FILE: 3, LOCATION: 4, SYSTEM: 5 } as const;

export const SYSTEM_SENDER = "@system";

export function conversationKey(me: string, message: { from: string; to: string; group: string }): string {
  if (message.group) return `group:${message.group}`;
  return `user:${message.from === me ? message.to : message.from}`;
}

/**
 * The page's key of an SDK timeline key ("d:alice:bob" with ':' and '%' escaped,
 * "g:ID"): the group, or the 1:1's other user; undefined for anything else.
 */
export function keyOfTimeline(me: string, timeline: string): string | undefined {
  if (timeline.startsWith("g:")) return `group:${timeline.slice(2)}`;
  if (!timeline.startsWith("d:")) return undefined;
  const names = timeline
    .slice(2)
    .split(":")
    .map((name) => name.replaceAll("%3A", ":").replaceAll("%25", "%"));
  if (names.length !== 2) return undefined;
  const other = names[0] === me ? names[1] : names[0];
  return `user:${other}`;
}

export function kindOf(type: number): ItemKind {
  if (type === TYPE.IMAGE) return "image";
  if (type === TYPE.FILE || type === TYPE.VOICE) return "file";
  if (type === TYPE.SYSTEM) return "system";
  return "text";
}

function mediaOf(message: MessageLike): MediaInfo | undefined {
  const media = message.media;
  if (media === undefined || !media.url) return undefined;
  return {
    url: media.url,
    thumbnailUrl: media.thumbnailUrl,
    name: media.name,
    mime: media.mime,
    size: Number(media.size),
    width: media.width,
    height: media.height,
  };
}

/** How a message reads in the conversation list. */
export function previewOf(item: {
  kind: ItemKind;
  text: string;
  media: MediaInfo | undefined;
  mine: boolean;
  recalled?: boolean;
}): string {
  const prefix = item.mine ? "You: " : "";
  if (item.recalled) return `${prefix}message recalled`;
  if (item.kind === "image") return `${prefix}[image] ${item.media?.name ?? ""}`.trim();
  if (item.kind === "file") return `${prefix}[file] ${item.media?.name ?? ""}`.trim();
  if (item.kind === "system") return parseNotice(item.text).summary.slice(0, 80);
  return prefix + item.text.replace(/\s+/g, " ").slice(0, 80);
}

const MARK_ORDER: Record<Mark, number> = { failed: -1, sending: 0, sent: 1, delivered: 2, read: 3 };

export class ChatModel {
  readonly conversations = new Map<string, Conversation>();
  /** The conversation on screen (its new messages are not unread while the page is seen). */
  open: string | undefined;
  pageVisible = true;
  private readonly byClientSeq = new Map<string, Item>();
  private readonly byMsgId = new Map<string, Item>();
  private readonly typists = new Map<string, Map<string, number>>();
  private localCounter = 0;

  /** `device`: this page's device name (its own messages coming back are matched by
   * client_seq only when they came from it; the user's other devices number theirs). */
  constructor(
    readonly me: string,
    readonly device = "",
  ) {}

  conversation(key: string, title?: string): Conversation {
    let conversation = this.conversations.get(key);
    if (conversation === undefined) {
      const [kind, id] = splitKey(key);
      conversation = {
        key,
        peer: kind === "user" ? id : "",
        group: kind === "group" ? id : "",
        title: title ?? (kind === "group" ? `# ${id}` : id === SYSTEM_SENDER ? "System notices" : id),
        unread: 0,
        items: [],
        lastAt: 0,
        preview: "",
      };
      this.conversations.set(key, conversation);
    } else if (title !== undefined) {
      conversation.title = title;
    }
    return conversation;
  }

  /** Newest activity first. */
  sorted(): Conversation[] {
    return [...this.conversations.values()].sort((a, b) => b.lastAt - a.lastAt || a.key.localeCompare(b.key));
  }

  /** The catch-up summary: the conversations and their newest messages (the SDK counts). */
  summary(entries: readonly { peer: string; group: string; newest?: MessageLike | undefined }[]): void {
    for (const entry of entries) {
      const key = entry.group ? `group:${entry.group}` : `user:${entry.peer}`;
      const conversation = this.conversation(key);
      const newest = entry.newest;
      if (newest !== undefined && newest.id && !newest.change) {
        const at = Number(newest.sentAtMs);
        if (at >= conversation.lastAt) {
          conversation.lastAt = at;
          const mine = newest.from === this.me;
          conversation.preview = previewOf({ kind: kindOf(newest.type), text: newest.text, media: mediaOf(newest), mine });
        }
      }
    }
  }

  /**
   * A message from the SDK (live, from catch-up or gap healing, or from history).
   * Returns its item, or undefined when it was already shown. (Unread counts are the
   * SDK's, from read marks: `setUnread`.)
   */
  received(message: MessageLike): Item | undefined {
    if (message.change) return undefined; // a change entry: `changed` applies it
    const msgId = String(message.id);
    if (message.id && this.byMsgId.has(msgId)) return undefined;
    const mine = message.from === this.me;
    const fromHere = !message.device || !this.device || message.device === this.device;
    if (mine && fromHere && message.clientSeq) {
      const waiting = this.byClientSeq.get(String(message.clientSeq));
      if (waiting !== undefined && waiting.from === message.from) {
        // Our own message coming back (another device, a history page): one item.
        waiting.msgId = msgId;
        waiting.seq = Number(message.seq);
        this.byMsgId.set(msgId, waiting);
        return undefined;
      }
    }
    const key = conversationKey(this.me, message);
    const conversation = this.conversation(key);
    this.typists.get(key)?.delete(message.from); // what they typed has arrived
    const item: Item = {
      key: message.id ? `m${msgId}` : `l${++this.localCounter}`,
      msgId,
      clientSeq: String(message.clientSeq),
      from: message.from,
      mine,
      via: mine && !fromHere ? (message.device ?? "") : "",
      kind: kindOf(message.type),
      text: message.text,
      media: mediaOf(message),
      seq: Number(message.seq),
      at: Number(message.sentAtMs) || Date.now(),
      mark: mine ? "sent" : undefined,
      progress: undefined,
      recalled: Boolean(message.recalled),
      edited: Boolean(message.edited),
    };
    if (message.id) this.byMsgId.set(msgId, item);
    insertBySeq(conversation.items, item);
    this.touch(conversation, item);
    return item;
  }

  /** A message the user is sending (shown at once, marked "sending"). */
  sending(to: { peer?: string; group?: string }, kind: ItemKind, text: string, media?: MediaInfo): Item {
    const key = to.group ? `group:${to.group}` : `user:${to.peer}`;
    const conversation = this.conversation(key);
    const item: Item = {
      key: `l${++this.localCounter}`,
      msgId: "0",
      clientSeq: "",
      from: this.me,
      mine: true,
      via: "",
      kind,
      text,
      media,
      seq: Number.MAX_SAFE_INTEGER,
      at: Date.now(),
      mark: "sending",
      progress: kind === "text" ? undefined : 0,
      recalled: false,
      edited: false,
    };
    conversation.items.push(item);
    this.touch(conversation, item);
    return item;
  }

  /** The SDK numbered the message (its client_seq), so its outcome can find it. */
  numbered(item: Item, clientSeq: bigint): void {
    item.clientSeq = String(clientSeq);
    this.byClientSeq.set(item.clientSeq, item);
  }

  /** msg:A: the node took it (its id and place). */
  taken(clientSeq: bigint, msgId: bigint, seq: bigint): Item | undefined {
    const item = this.byClientSeq.get(String(clientSeq));
    if (item === undefined) return undefined;
    item.msgId = String(msgId);
    if (seq) item.seq = Number(seq);
    this.byMsgId.set(item.msgId, item);
    this.raise(item, "sent");
    return item;
  }

  /** The SDK's outcome for a sent message. */
  outcome(outcome: { clientSeq: bigint; msgId: bigint; status: string }): Item | undefined {
    const item = this.byClientSeq.get(String(outcome.clientSeq));
    if (item === undefined) return undefined;
    if (outcome.msgId) {
      item.msgId = String(outcome.msgId);
      this.byMsgId.set(item.msgId, item);
    }
    if (outcome.status === "failed") item.mark = "failed";
    else if (outcome.status === "delivered") this.raise(item, "delivered");
    else this.raise(item, "sent");
    return item;
  }

  /**
   * A message was recalled (its content gone) or edited (its new text), by whoever the
   * node allowed; the item it names, if shown.
   */
  changed(change: { event: string; msgId: bigint; text: string }): Item | undefined {
    const item = this.byMsgId.get(String(change.msgId));
    if (item === undefined) return undefined;
    if (change.event === "recall") {
      item.recalled = true;
      item.edited = false;
      item.text = "";
      item.media = undefined;
    } else if (change.event === "edit" && !item.recalled) {
      item.text = change.text;
      item.edited = true;
    }
    for (const conversation of this.conversations.values()) {
      const last = conversation.items[conversation.items.length - 1];
      if (last === item) conversation.preview = previewOf(item);
    }
    return item;
  }

  /** Someone is typing (until `until`, ms) in a conversation, or stopped (`until` 0). */
  typing(key: string, user: string, until: number): void {
    let users = this.typists.get(key);
    if (users === undefined) this.typists.set(key, (users = new Map()));
    if (until > 0) users.set(user, until);
    else users.delete(user);
  }

  /** Who is typing in `key` at `now` (ms), in the order they started. */
  typingIn(key: string, now: number): string[] {
    const users = this.typists.get(key);
    if (users === undefined) return [];
    for (const [user, until] of users) if (until <= now) users.delete(user);
    return [...users.keys()];
  }

  /** The peer read up to `seq` in `key` (read receipts): every own message there up to it. */
  readThrough(key: string, seq: number): Item[] {
    const conversation = this.conversations.get(key);
    if (conversation === undefined) return [];
    const changed: Item[] = [];
    for (const item of conversation.items) {
      if (item.mine && item.seq <= seq && item.mark !== "read" && item.mark !== "failed") {
        item.mark = "read";
        changed.push(item);
      }
    }
    return changed;
  }

  /**
   * The SDK's unread count of a conversation (newest seq minus the user's read point,
   * read on any device). The one on screen shows none: the page marks it read.
   */
  setUnread(key: string, unread: number): void {
    this.conversation(key).unread = this.open === key && this.pageVisible ? 0 : unread;
  }

  /** Whether the user is looking at `key` now (its messages are being read). */
  seeing(key: string): boolean {
    return this.open === key && this.pageVisible;
  }

  /** The user opened a conversation (or came back to the page showing it). */
  opened(key: string | undefined): void {
    this.open = key;
    if (key !== undefined && this.pageVisible) {
      const conversation = this.conversations.get(key);
      if (conversation !== undefined) conversation.unread = 0;
    }
  }

  totalUnread(): number {
    let total = 0;
    for (const conversation of this.conversations.values()) total += conversation.unread;
    return total;
  }

  private raise(item: Item, mark: Mark): void {
    if (item.mark === undefined || item.mark === "failed" || MARK_ORDER[mark] > MARK_ORDER[item.mark]) item.mark = mark;
  }

  private touch(conversation: Conversation, item: Item): void {
    if (item.at >= conversation.lastAt) {
      conversation.lastAt = item.at;
      conversation.preview = previewOf(item);
    }
  }
}

function splitKey(key: string): [string, string] {
  const at = key.indexOf(":");
  return [key.slice(0, at), key.slice(at + 1)];
}

/** Keep items in timeline order; those not yet placed (seq unknown) stay last. */
function insertBySeq(items: Item[], item: Item): void {
  let index = items.length;
  while (index > 0 && items[index - 1]!.seq > item.seq) index--;
  items.splice(index, 0, item);
}
