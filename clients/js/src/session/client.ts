/**
 * A logged-in chat session that stays online: the SDK's main object
 * (cim/client/session.py). One user's device.
 *
 * Its parts: reaching a node (dialing.ts: router login, fast reconnect, backoff), the
 * connection (connection.ts: handshake, heartbeats following foreground/background),
 * sending (delivery.ts: the outbox with auto/manual retries), receiving (inbox.ts:
 * dedup, order, gap healing), catching up (catch-up.ts: summary first, newest page
 * first), read marks and unread counts (reads.ts) and requests with deadlines
 * (answers.ts). The session routes frames between
 * them and tells the application through typed events (`ChatEvents`).
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { mediaMessage, type StoredFile } from "../api/files.js";
import { RECONNECT_BACKOFF, realClock, type Backoff, type Clock } from "../clock.js";
import { Emitter } from "../events.js";
import { pb } from "../protocol/frames.js";
import { CumulativeAcks } from "./acks.js";
import { Answers, ConnectionLost, DEFAULT_REQUEST_POLICY, RequestRefused, type RequestPolicy } from "./answers.js";
import { CatchUp, type CatchUpResult } from "./catch-up.js";
import { DEFAULT_MAX_FRAME_SIZE, type ImConnection, type WebSocketFactory } from "./connection.js";
import { Outbox, REASON_CONNECTION_CLOSED, RetryPolicy, type DeliveryOutcome, type RetryMode } from "./delivery.js";
import { Corrections, changeOf, type Change } from "./corrections.js";
import { Dialer, SessionFailed, SessionRefused } from "./dialing.js";
import { Inbox } from "./inbox.js";
import { ReadState, type ReadEvent, type UnreadChange } from "./reads.js";
import { RouterClient, type Fetch, type LoginTicket } from "./router.js";
import { MemorySeenStore, type SeenStore } from "./seen.js";

export type SessionState = "offline" | "connecting" | "online" | "reconnecting" | "stopped";

/** Everything the application sees, by event name. */
export interface ChatEvents {
  /** The session's state changed (`detail`: where, or why). */
  state: { state: SessionState; detail: string };
  /** Logged in on a node (every connection, first and reconnects). */
  online: { loginResult: pb.LoginResult; url: string };
  /**
   * A message for the application, once, in seq order per conversation. `live`: not
   * from catch-up. `own`: the user sent it (from another device: this device's own
   * sends are not handed back).
   */
  message: { message: pb.Message; live: boolean; own: boolean };
  /** A sent message ended: delivered, stored, accepted or failed. */
  outcome: DeliveryOutcome;
  /** The catch-up summary (unread per conversation), before its pull. */
  summary: pb.OfflineSummaryA;
  /** A catch-up finished. */
  caughtUp: CatchUpResult;
  /** The node ended the session (`code` says whether reconnecting makes sense). */
  kicked: pb.Kicked;
  /** The node is shutting down; the session reconnects after `reconnectAfterMs`. */
  goingAway: pb.GoingAway;
  /** A message was recalled or edited (by its sender, or a group's owner or admin). */
  change: { change: Change; live: boolean };
  /** Someone is typing in a conversation with this user (or stopped). */
  typing: pb.TypingN;
  /** READ_N: another device of the user read (`own`: the unread count dropped), or a 1:1 peer read up to `seq` (✓✓). */
  read: ReadEvent;
  /** A conversation's unread count changed (summary, messages, read marks from any device). */
  unread: UnreadChange;
  /** An ERROR the session could not tie to a request or message. */
  error: pb.Error;
  /** The session stopped for good without the user asking (bad password, kicked). */
  failed: SessionFailed;
}

export interface ChatClientOptions {
  /** One router base URL or several (the first that answers is used). */
  routers: string | readonly string[];
  user: string;
  password: string;
  /** This device's name (default "web"); `webDeviceName(localStorage)` keeps one per browser. */
  device?: string;
  /** "auto" (resend after 10, 40, 100 s; failed at 160 s) or "manual", or a RetryPolicy. */
  retry?: RetryMode | RetryPolicy;
  /** False: a device that sends and asks but takes no messages (no cursor moves). */
  receiving?: boolean;
  /** True: catch-up hands each conversation over oldest first (default: newest page first). */
  ordered?: boolean;
  seen?: SeenStore;
  requests?: RequestPolicy;
  backoff?: Backoff;
  webSocket?: WebSocketFactory;
  fetch?: Fetch;
  clock?: Clock;
  random?: () => number;
  /** Follow the page's visibility for heartbeats and fast reconnects (browsers; default true). */
  watchVisibility?: boolean;
}

type DocumentLike = { visibilityState?: string; addEventListener?: (name: string, fn: () => void) => void; removeEventListener?: (name: string, fn: () => void) => void };

export class ChatClient extends Emitter<ChatEvents> {
  readonly user: string;
  readonly device: string;
  readonly clock: Clock;
  readonly outbox: Outbox;
  readonly answers: Answers;
  readonly inbox: Inbox;
  /** Group acks, one ack:R per conversation for many messages (acks.ts). */
  readonly acks: CumulativeAcks;
  readonly catchUp: CatchUp;
  readonly router: RouterClient;
  readonly corrections = new Corrections();
  /** Unread counts per conversation, the user's read marks, the peers' (✓✓). */
  readonly reads: ReadState;
  readonly maxFrameSize = DEFAULT_MAX_FRAME_SIZE;
  state: SessionState = "offline";
  stopping = false;
  foreground = true;
  ticket: LoginTicket | undefined;
  current: ImConnection | undefined;
  private readonly dialer: Dialer;
  private nextSeq: bigint;
  private readonly lastSeqTo = new Map<string, bigint>();
  private waiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private readonly unwatch: (() => void)[] = [];

  constructor(options: ChatClientOptions) {
    super();
    this.user = options.user;
    this.device = options.device ?? "web";
    this.clock = options.clock ?? realClock;
    const random = options.random ?? Math.random;
    this.router = new RouterClient(options.routers, options.fetch);
    this.dialer = new Dialer(
      this,
      this.clock,
      this.router,
      options.password,
      options.backoff ?? RECONNECT_BACKOFF,
      options.webSocket,
      random,
    );
    // Microseconds of the wall clock: numbers keep increasing across restarts.
    this.nextSeq = BigInt(this.clock.now()) * 1000n;
    const retry = options.retry instanceof RetryPolicy ? options.retry : new RetryPolicy(options.retry ?? "auto");
    this.outbox = new Outbox(this.clock, (m) => this.transmit(m), (o) => this.emit("outcome", o), retry, 1000, random);
    this.answers = new Answers(this.clock, () => this.connection(), options.requests ?? DEFAULT_REQUEST_POLICY, random);
    this.acks = new CumulativeAcks(this.clock, (ack) => this.sendAck(ack));
    this.inbox = new Inbox(
      this.user,
      options.seen ?? new MemorySeenStore(),
      (message, live) => this.deliver(message, live),
      (message, through) => this.acknowledge(message, through),
      (conversation, peer, group, after, before) =>
        this.answers.ask<pb.HistoryA>(
          pb.FrameType.HISTORY_R,
          create(pb.HistoryRSchema, { peer, group, after, before, maxBytes: this.maxFrameSize }),
        ),
      (conversation) => void this.catchUp.start(conversation),
      (message) => message.from === this.user && message.device === this.device && this.outbox.isWaiting(message.clientSeq),
    );
    this.catchUp = new CatchUp(this.clock, this.answers, this.inbox, () => this.maxFrameSize, options.ordered ?? false, 0, random);
    this.catchUp.onSummary = (summary) => this.emit("summary", summary);
    this.reads = new ReadState(this.user);
    this.reads.onUnread = (change) => this.emit("unread", change);
    this.catchUp.bookkeeping = (summary) => this.reads.summary(summary);
    if (options.receiving === false) this.inbox.close();
    if (options.watchVisibility ?? true) this.watchPage();
  }

  // --- the session's life -------------------------------------------------------------

  /** Resolves when the session is online for the first time, or rejects if it gives up. */
  start(deadlineMs?: number): Promise<void> {
    const online = new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (deadlineMs !== undefined) this.dialer.firstDeadline(deadlineMs);
    this.stopping = false;
    this.dialer.connectSoon(0);
    return online;
  }

  /** Close the connection; with `logout`, also end the session at the router. */
  async stop(logout = true): Promise<void> {
    this.stopping = true;
    this.dialer.endFirstContact();
    this.dialer.cancel();
    this.inbox.close();
    this.acks.flush(); // what it did take is acknowledged before the connection goes
    this.catchUp.stop();
    this.outbox.failAll("the client stopped before an answer came");
    for (const off of this.unwatch.splice(0)) off();
    const connection = this.current;
    this.current = undefined;
    connection?.close("the client stopped");
    this.answers.connectionLost("the client stopped");
    if (logout) await this.dialer.logout();
    this.ticket = undefined;
    this.setState("stopped", "stopped by the application");
  }

  /**
   * The application came to the foreground or went to the background (a browser's page
   * visibility does this by itself; Node apps call it). The node is told (APP_STATE_R):
   * its idle timeout and this connection's heartbeat follow its answer (`[im]
   * background_heartbeat_interval`). Remembered for every later connection.
   */
  setForeground(foreground: boolean): void {
    const changed = foreground !== this.foreground;
    this.foreground = foreground;
    this.current?.setForeground(foreground);
    if (changed && this.connection() !== undefined) this.tellAppState().catch(() => {});
    if (foreground) this.dialer.hurry();
  }

  /** APP_STATE_R with the app's state; the answer sets the connection's heartbeat. */
  private async tellAppState(): Promise<pb.AppStateA> {
    const state = this.foreground ? pb.AppState.APP_FOREGROUND : pb.AppState.APP_BACKGROUND;
    const connection = this.current;
    const answer = await this.answers.ask<pb.AppStateA>(pb.FrameType.APP_STATE_R, create(pb.AppStateRSchema, { state }));
    if (connection !== undefined && connection === this.current && answer.heartbeatIntervalMs) {
      connection.setHeartbeat(answer.heartbeatIntervalMs, answer.heartbeatTimeoutMs);
    }
    return answer;
  }

  private watchPage(): void {
    const doc = (globalThis as { document?: DocumentLike }).document;
    if (doc?.addEventListener !== undefined) {
      const changed = () => this.setForeground(doc.visibilityState !== "hidden");
      doc.addEventListener("visibilitychange", changed);
      this.unwatch.push(() => doc.removeEventListener?.("visibilitychange", changed));
      this.foreground = doc.visibilityState !== "hidden";
    }
    const win = globalThis as { addEventListener?: (n: string, f: () => void) => void; removeEventListener?: (n: string, f: () => void) => void };
    if (doc !== undefined && win.addEventListener !== undefined) {
      const back = () => this.dialer.hurry(); // the network is back: do not wait the backoff out
      win.addEventListener("online", back);
      this.unwatch.push(() => win.removeEventListener?.("online", back));
    }
  }

  setState(state: SessionState, detail = ""): void {
    this.state = state;
    this.emit("state", { state, detail });
  }

  loggedIn(connection: ImConnection, result: pb.LoginResult, where: string): void {
    this.current = connection;
    this.outbox.connectionMade(); // before anyone hears "online" and sends more
    this.setState("online", where);
    this.emit("online", { loginResult: result, url: where });
    for (const waiter of this.waiters.splice(0)) waiter.resolve();
    // Every connection starts in the foreground: a background app says so (a node that
    // refuses keeps the foreground's heartbeat, more often, never too late).
    if (!this.foreground) this.tellAppState().catch(() => {});
    if (!this.inbox.closed) void this.catchUp.start().then((result) => this.emit("caughtUp", result));
  }

  giveUp(why: string, error: SessionFailed): void {
    this.stopping = true;
    this.dialer.endFirstContact();
    this.setState("stopped", why);
    this.outbox.failAll(`the session stopped: ${why}`);
    this.emit("failed", error);
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
  }

  private connection(): ImConnection | undefined {
    return this.current?.established ? this.current : undefined;
  }

  frame(type: number, message: object): void {
    const T = pb.FrameType;
    if (this.answers.answer(type, message)) return;
    switch (type) {
      case T.MSG_N:
        if (!this.stopping) this.inbox.receive(message as pb.Message);
        break;
      case T.MSG_A: {
        const answer = message as pb.MsgA;
        this.outbox.taken(answer);
        this.inbox.own(answer.conversation, answer.seq);
        this.reads.sent(answer.conversation, answer.seq);
        break;
      }
      case T.READ_N:
        if (!this.stopping) this.emit("read", this.reads.notice(message as pb.ReadNotice));
        break;
      case T.ACK_N:
        this.outbox.acknowledged(message as pb.AckN);
        break;
      case T.TYPING_N:
        if (!this.stopping) this.emit("typing", message as pb.TypingN);
        break;
      case T.OFFLINE_NOTICE: {
        const notice = message as pb.OfflineNotice;
        const mark = notice.conversation ? this.inbox.watermark(notice.conversation) : undefined;
        if (mark === undefined || notice.seq > mark) {
          void this.catchUp.start(notice.conversation || null).then((result) => this.emit("caughtUp", result));
        }
        break;
      }
      case T.KICKED:
        this.kicked(message as pb.Kicked);
        break;
      case T.GOING_AWAY:
        this.dialer.goingAway = (message as pb.GoingAway).reconnectAfterMs;
        this.emit("goingAway", message as pb.GoingAway);
        break;
      case T.ERROR: {
        const error = message as pb.Error;
        if (this.answers.refused(error)) break;
        if (error.requestType === T.MSG_R || error.clientSeq) this.outbox.refused(error);
        else this.emit("error", error);
        break;
      }
      default:
        break;
    }
  }

  /**
   * KICKED: only SESSION_EXPIRED logs in again; every other code (logged in elsewhere,
   * logged out, replaced by a newer connection of this device, by an admin, too many
   * devices of the user online) stops the session: reconnecting would take the place
   * back from whoever took it.
   */
  private kicked(kicked: pb.Kicked): void {
    this.emit("kicked", kicked);
    if (this.stopping) return;
    if (kicked.code === pb.Kicked_Code.SESSION_EXPIRED) {
      this.ticket = undefined; // log in again through the router, then reconnect
      return;
    }
    this.giveUp(`kicked: ${kicked.reason}`, new SessionRefused(`kicked: ${kicked.reason}`));
  }

  closed(reason: string): void {
    if (this.current === undefined) return;
    this.current = undefined;
    this.acks.forget(); // past the cursors: the next catch-up brings them again
    this.outbox.connectionLost(REASON_CONNECTION_CLOSED);
    this.answers.connectionLost(reason);
    if (this.stopping) {
      if (this.state !== "stopped") this.setState("offline", reason);
      return;
    }
    this.setState("reconnecting", reason);
    this.dialer.reconnect();
  }

  // --- receiving ----------------------------------------------------------------------

  /** The inbox hands over a message or a change entry, in its conversation's order. */
  private deliver(message: pb.Message, live: boolean): void {
    this.reads.received(message); // first: a listener reads the counts as they now are
    const change = changeOf(message);
    if (change !== undefined) {
      this.emit("change", { change: this.corrections.apply(change), live });
      return;
    }
    this.corrections.remember(message);
    this.emit("message", { message, live, own: message.from === this.user });
  }

  /** ack:R: a group's is cumulative, one for many messages (acks.ts). */
  private acknowledge(message: pb.Message, throughSeq: bigint): void {
    if (this.connection() === undefined) return; // the next catch-up moves the cursor
    this.acks.acknowledge(message, throughSeq);
  }

  private sendAck(ack: pb.AckR): void {
    if (this.connection() === undefined) return; // the next catch-up moves the cursor
    this.answers.ask(pb.FrameType.ACK_R, ack).catch(() => {
      // Only the cursor is behind: the next catch-up's cursors move it.
    });
  }

  /** Catch up now on one conversation, or on all of them (what a login does). */
  catchUpNow(conversation?: string): Promise<CatchUpResult> {
    return this.catchUp.start(conversation ?? null);
  }

  /** Stop taking messages: those not handed over stay unread on the node. */
  stopReceiving(): void {
    this.inbox.close();
  }

  // --- sending ------------------------------------------------------------------------

  private transmit(message: pb.Message): boolean {
    const connection = this.connection();
    if (connection === undefined) return false;
    connection.send(pb.FrameType.MSG_R, message);
    return true;
  }

  sendText(to: string, text: string): Promise<DeliveryOutcome> {
    return this.sendMessage({ to, text });
  }

  sendGroup(group: string, text: string): Promise<DeliveryOutcome> {
    return this.sendMessage({ group, text });
  }

  /**
   * Send any user message (text, media, location, 1:1 or group); the SDK numbers it.
   * Resolves once with the outcome (never rejects). While reconnecting, `auto` keeps
   * it for the new connection and `manual` fails it at once.
   */
  sendMessage(init: MessageInitShape<typeof pb.MessageSchema>): Promise<DeliveryOutcome> {
    const message = create(pb.MessageSchema, init);
    const clientSeq = this.nextSeq++;
    message.clientSeq = clientSeq;
    message.clientTimeMs = BigInt(this.clock.now());
    const conversation = message.group ? `group:${message.group}` : `user:${message.to}`;
    message.prevSeq = this.lastSeqTo.get(conversation) ?? 0n;
    this.lastSeqTo.set(conversation, clientSeq);
    const refuse =
      this.current === undefined && (this.stopping || this.state === "offline" || this.state === "stopped")
        ? `not connected (${this.state})`
        : undefined;
    return this.outbox.add(message, refuse);
  }

  /** Send an uploaded file (FileClient.upload's `file`) to a user or, with `group`, a group. */
  sendFile(toOrGroup: string, file: StoredFile, options: { group?: boolean; text?: string } = {}): Promise<DeliveryOutcome> {
    const target = options.group ? { group: toOrGroup } : { to: toOrGroup };
    return this.sendMessage({ ...mediaMessage(file), ...target, text: options.text ?? "" });
  }

  /** Send a failed (or still waiting) message again with the same client_seq. */
  resend(clientSeq: bigint): Promise<DeliveryOutcome> {
    return this.outbox.resend(clientSeq);
  }

  // --- recall, edit, typing -----------------------------------------------------------

  /**
   * Recall one of this user's messages (within `[im] recall_window`; a group's owner or
   * admin: any message of the group). Resolves with the change made; rejects with
   * RequestRefused (its `reason`: unknown_message, not_yours, too_late, recalled).
   */
  recall(msgId: bigint): Promise<Change> {
    return this.change(create(pb.ChangeRSchema, { msgId, kind: pb.ChangeKind.RECALL }));
  }

  /** Replace the text of one of this user's text messages (within `[im] edit_window`). */
  edit(msgId: bigint, text: string): Promise<Change> {
    return this.change(create(pb.ChangeRSchema, { msgId, kind: pb.ChangeKind.EDIT, text }));
  }

  private async change(request: pb.ChangeR): Promise<Change> {
    // Not repeated after a silence: the node may have made it.
    const answer = await this.answers.ask<pb.ChangeA>(pb.FrameType.CHANGE_R, request, false);
    // The entry's place is dealt with here (as a msg:A's): not shown back.
    this.inbox.own(answer.conversation, answer.seq);
    this.reads.sent(answer.conversation, answer.seq);
    return this.corrections.apply({
      event: answer.kind === pb.ChangeKind.RECALL ? "recall" : "edit",
      msgId: answer.msgId,
      conversation: answer.conversation,
      seq: answer.replacesSeq,
      by: this.user,
      text: request.text,
      atMs: answer.changedAtMs,
      entryId: answer.entryId,
      entrySeq: answer.seq,
    });
  }

  /**
   * Tell `toOrGroup` that this user is typing (or, `stopped`, no longer). The node
   * passes on one per conversation every 3 s (the answer's `dropped`); never stored.
   */
  typing(toOrGroup: string, options: { group?: boolean; stopped?: boolean } = {}): Promise<pb.TypingA> {
    const request = create(pb.TypingRSchema, {
      ...(options.group ? { group: toOrGroup } : { to: toOrGroup }),
      state: options.stopped ? pb.TypingState.TYPING_STOPPED : pb.TypingState.TYPING_STARTED,
    });
    // Not repeated after its deadline: a late "typing" is worse than none.
    return this.answers.ask(pb.FrameType.TYPING_R, request, false);
  }

  // --- read marks ---------------------------------------------------------------------

  /**
   * Mark `conversation` (a timeline key, `Message.conversation`; `conversationKey()`
   * makes one from a name) read up to `seq`, or up to the newest message this device
   * has there. Resolves with READ_A (the mark in effect: a lower `seq` changes
   * nothing); a seq past the end or a conversation not the user's rejects with
   * RequestRefused, nothing to mark with a RangeError. The user's other devices and a
   * 1:1 peer hear of it (READ_N), the peer only while the user's `read_receipts` are on.
   */
  async markRead(conversation: string, seq?: bigint): Promise<pb.ReadA> {
    const upTo = seq ?? this.reads.newest(conversation);
    if (upTo <= 0n) throw new RangeError(`nothing to mark read in ${JSON.stringify(conversation)} yet`);
    const answer = await this.answers.ask<pb.ReadA>(pb.FrameType.READ_R, create(pb.ReadRSchema, { conversation, seq: upTo }));
    this.reads.marked(answer);
    return answer;
  }

  /**
   * Who has read message `seq` of a conversation (its sender asks; anyone else is
   * refused, FORBIDDEN): `count`, `readers` (at most 1,000 names), `members` counted.
   */
  readers(conversation: string, seq: bigint): Promise<pb.ReadersA> {
    return this.answers.ask(pb.FrameType.READERS_R, create(pb.ReadersRSchema, { conversation, seq }));
  }

  /**
   * The user's privacy settings (CONTACTS_R `settings`): with `changes`, those fields
   * change (empty ones stay); resolves with the settings in effect. `read_receipts`
   * "off": peers and group senders no longer see what the user reads.
   */
  async privacySettings(changes: MessageInitShape<typeof pb.PrivacySettingsSchema> = {}): Promise<pb.PrivacySettings> {
    const answer = await this.contactsRequest({ op: { case: "settings", value: changes } });
    if (!answer.ok) throw new RequestRefused("CONTACTS_R", answer.message || answer.error, 0, answer.error);
    return answer.settings ?? create(pb.PrivacySettingsSchema);
  }

  /** Turn read receipts on or off (the `read_receipts` privacy setting). */
  setReadReceipts(on: boolean): Promise<pb.PrivacySettings> {
    return this.privacySettings({ readReceipts: on ? "on" : "off" });
  }

  // --- requests -----------------------------------------------------------------------

  /** The catch-up summary: unread per conversation, newest activity first. */
  offlineSummary(): Promise<pb.OfflineSummaryA> {
    return this.catchUp.summary();
  }

  /**
   * One page of a conversation's timeline, newest first, whatever the cursors.
   * `before` 0 is the newest page, else the previous answer's `nextBefore`.
   * A refusal (`error == "forbidden"`) is an answer with `error` set.
   */
  history(peerOrGroup: string, options: { limit?: number; before?: bigint; group?: boolean } = {}): Promise<pb.HistoryA> {
    const request = create(pb.HistoryRSchema, {
      before: options.before ?? 0n,
      limit: options.limit ?? 50,
      maxBytes: this.maxFrameSize,
      ...(options.group ? { group: peerOrGroup } : { peer: peerOrGroup }),
    });
    return this.answers.ask(pb.FrameType.HISTORY_R, request);
  }

  online(offset = 0, limit = 100): Promise<pb.OnlineA> {
    return this.answers.ask(pb.FrameType.ONLINE_R, create(pb.OnlineRSchema, { offset, limit }));
  }

  /**
   * The user's own devices online now (DEVICES_R), sorted by name: `device`,
   * `connectedAtMs`, `activeAtMs` (node time of its last frame), `thisDevice`.
   */
  async devices(): Promise<pb.DeviceOnline[]> {
    const answer = await this.answers.ask<pb.DevicesA>(pb.FrameType.DEVICES_R, create(pb.DevicesRSchema));
    return answer.devices;
  }

  /** Any GROUP_R (create, rename, add, invite, remove, promote, leave, dissolve, list, ...). */
  groupRequest(init: MessageInitShape<typeof pb.GroupRequestSchema>): Promise<pb.GroupAnswer> {
    return this.answers.group(create(pb.GroupRequestSchema, init));
  }

  createGroup(name: string, members: string[] = []): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "create", value: { name, members } } });
  }

  addMembers(group: string, users: string[]): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "add", value: { group, users } } });
  }

  removeMembers(group: string, users: string[]): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "remove", value: { group, users } } });
  }

  inviteMembers(group: string, users: string[]): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "invite", value: { group, users } } });
  }

  renameGroup(group: string, name: string): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "rename", value: { group, name } } });
  }

  leaveGroup(group: string): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "leave", value: { group } } });
  }

  acceptInvitation(group: string): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "accept", value: { group } } });
  }

  listGroups(): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "list", value: {} } });
  }

  groupMembers(group: string): Promise<pb.GroupAnswer> {
    return this.groupRequest({ op: { case: "members", value: { group } } });
  }

  /** Any CONTACTS_R (list, request, accept, decline, remove, block, unblock, settings). */
  contactsRequest(init: MessageInitShape<typeof pb.ContactsRequestSchema>): Promise<pb.ContactsAnswer> {
    return this.answers.ask(pb.FrameType.CONTACTS_R, create(pb.ContactsRequestSchema, init));
  }

  /** The router token of the current login (for the logic and file services). */
  get token(): string {
    if (this.ticket === undefined) throw new ConnectionLost("not logged in");
    return this.ticket.token;
  }
}
