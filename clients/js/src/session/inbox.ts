/**
 * Each conversation's timeline as this device has it, and what goes to the application
 * (cim/client/inbox.py, where the rules are explained at length).
 *
 * Per conversation a watermark: everything up to it was handed over (or dealt with).
 * It comes from the login's summary and moves as messages are handed over in seq
 * order. A live msg:N with seq = top + 1 goes at once and is acknowledged (ack:R with
 * through_seq = the watermark); a seq at or below the watermark, a known id, a known
 * (sender, device, client_seq) or this device's own message still waiting is a
 * duplicate: dropped and acknowledged again; a seq after a gap is held and the gap
 * is asked at once with HISTORY_R(after = top, before = seq) (gap healing). A gap of
 * more than a page, or one while the conversation is being caught up, waits for the
 * catch-up instead, and so does one whose fill the node refused for now (a database
 * down): what came stays held, so order holds through a short outage. After
 * MAX_REFUSED_ROUNDS such tries, or a refusal that will not change, what came is
 * shown with the watermark below the hole, and the catch-up brings the hole later. A
 * fill answers only its own range. Nothing waits for a window that gives up.
 */
import { create } from "@bufbuild/protobuf";
import { pb } from "../protocol/frames.js";
import { RETRYABLE, RequestFailed, RequestRefused, RequestTimedOut } from "./answers.js";
import { compare } from "./delivery.js";
import type { SeenStore } from "./seen.js";

export const DIRECT_PREFIX = "d:";

export type Fill = (conversation: string, peer: string, group: string, after: bigint, before: bigint) => Promise<pb.HistoryA>;

/** Seqs a gap fill may mark dealt with above an open hole (a fill is one page: only
 * rows removed in between make its range wider). */
const MAX_MARKED_RANGE = 4096n;

/** Tries in a row to bring one gap the node refused for now (each fill, and each
 * catch-up it handed the gap to, with its own retries: about 3 s each) before the
 * messages held behind it are shown without it: order is kept through an outage of
 * about 20 s, and a longer one holds a conversation back no longer than that. */
const MAX_REFUSED_ROUNDS = 6;

/** A fill's failure that may pass (the node's "not now", or no answer), rather than
 * one a retry cannot change (not a participant, a bad request). */
function forNow(error: unknown): boolean {
  if (error instanceof RequestTimedOut) return true;
  return error instanceof RequestRefused && RETRYABLE.has(error.code);
}

class Timeline {
  watermark: bigint | undefined;
  top = 0n;
  above = new Set<bigint>();
  held = new Map<bigint, pb.Message>();
  own = new Set<bigint>();
  declined = false;
  filling = false;
  catchingUp = false;
  /** Tries in a row to bring the open gap that ended without it (MAX_REFUSED_ROUNDS). */
  refusedRounds = 0;
  peer = "";
  group = "";

  constructor(readonly key: string) {}

  advance(): void {
    if (this.watermark === undefined) return;
    while (this.above.has(this.watermark + 1n)) {
      this.watermark += 1n;
      this.above.delete(this.watermark);
    }
    if (this.watermark > this.top) this.top = this.watermark;
  }

  dealtWith(seq: bigint): void {
    if (this.watermark === undefined || seq > this.watermark) {
      this.above.add(seq);
      if (seq > this.top) this.top = seq;
      this.advance();
    }
  }

  skipTo(seq: bigint): void {
    if (this.watermark === undefined || seq > this.watermark) {
      this.watermark = seq;
      this.above = new Set([...this.above].filter((s) => s > seq));
    }
    if (seq > this.top) this.top = seq;
    this.advance();
  }

  /**
   * A gap fill brought everything the node has in `after < seq < before`. It says
   * nothing of what is at or below `after`: with a hole open there (an earlier fill
   * failed and what came after was shown), the range is only marked dealt with and
   * the watermark stays below the hole, so no ack claims it and the next catch-up
   * brings it (skipping to `before - 1` lost it: the Python library's chaos loss).
   */
  filled(after: bigint, before: bigint): void {
    if (this.watermark === undefined || this.watermark >= after) {
      this.skipTo(before - 1n);
      return;
    }
    if (before - after - 1n <= MAX_MARKED_RANGE) {
      for (let seq = after + 1n; seq < before; seq++) this.above.add(seq);
    }
    if (before - 1n > this.top) this.top = before - 1n;
    this.advance();
  }

  lowestHeld(): bigint {
    return [...this.held.keys()].sort(compare)[0]!;
  }
}

export class Inbox {
  private readonly timelines = new Map<string, Timeline>();
  summaryPending = false;
  summaryComplete = false;
  duplicates = 0;
  closed = false;

  constructor(
    readonly user: string,
    readonly seen: SeenStore,
    private readonly deliver: (message: pb.Message, live: boolean) => boolean | void,
    private readonly acknowledge: (message: pb.Message, throughSeq: bigint) => void,
    private readonly fill: Fill,
    private readonly pull: (conversation: string) => void = () => {},
    private readonly sending: (message: pb.Message) => boolean = () => false,
  ) {}

  watermark(conversation: string): bigint | undefined {
    return this.timelines.get(conversation)?.watermark;
  }

  held(conversation?: string): number {
    if (conversation !== undefined) return this.timelines.get(conversation)?.held.size ?? 0;
    let total = 0;
    for (const timeline of this.timelines.values()) total += timeline.held.size;
    return total;
  }

  /** Hand over nothing more; what is held stays unacknowledged (the node keeps it). */
  close(): void {
    this.closed = true;
    for (const timeline of this.timelines.values()) timeline.held.clear();
  }

  /** The node says the device has dealt with `conversation` up to `seq`. */
  anchor(conversation: string, seq: bigint, peer = "", group = ""): void {
    const timeline = this.timeline(conversation);
    timeline.peer = peer || timeline.peer;
    timeline.group = group || timeline.group;
    timeline.skipTo(seq);
    this.drain(timeline);
  }

  /** A live msg:N from the node. */
  receive(message: pb.Message): void {
    if (this.closed) return;
    if (!message.conversation || !message.seq) {
      this.receiveUnnumbered(message);
      return;
    }
    const timeline = this.timeline(message.conversation);
    this.learn(timeline, message);
    const seq = message.seq;
    if (this.waitsForItsStart(timeline)) {
      if (this.isDuplicate(timeline, message)) this.duplicates++;
      else if (!timeline.held.has(seq)) timeline.held.set(seq, message);
      return;
    }
    if (this.isDuplicate(timeline, message)) {
      this.duplicates++;
      timeline.dealtWith(seq);
      this.ack(message, timeline);
      this.drain(timeline);
      return;
    }
    if (timeline.held.has(seq)) {
      this.duplicates++;
      return;
    }
    if (timeline.watermark === undefined || seq <= timeline.top + 1n) {
      this.handOver(timeline, message, true);
      this.drain(timeline);
      return;
    }
    timeline.held.set(seq, message);
    this.fillGap(timeline);
  }

  /** msg:A: this device's own message sits at `seq` (dealt with, not handed over). */
  own(conversation: string, seq: bigint): void {
    if (this.closed || !conversation || !seq) return;
    const timeline = this.timeline(conversation);
    const placeholder = create(pb.MessageSchema, { conversation, seq });
    if (this.waitsForItsStart(timeline)) {
      timeline.own.add(seq);
      timeline.held.set(seq, placeholder);
      return;
    }
    if (timeline.watermark === undefined || seq <= timeline.watermark) return;
    if (seq <= timeline.top + 1n) {
      timeline.above.add(seq);
      if (seq > timeline.top) timeline.top = seq;
      timeline.advance();
      this.drain(timeline);
      return;
    }
    timeline.own.add(seq);
    timeline.held.set(seq, placeholder);
    this.fillGap(timeline);
  }

  private waitsForItsStart(timeline: Timeline): boolean {
    if (timeline.watermark !== undefined) return false;
    if (this.summaryPending || timeline.catchingUp) return true;
    if (!this.summaryComplete) return false;
    if (timeline.key.startsWith(DIRECT_PREFIX)) {
      timeline.skipTo(0n);
      return false;
    }
    this.pullInstead(timeline);
    return true;
  }

  /** The summary anchored what it named (or failed): release what waited for it. */
  summaryDone(complete: boolean): void {
    this.summaryPending = false;
    this.summaryComplete ||= complete;
    for (const timeline of [...this.timelines.values()]) {
      if (!timeline.held.size || this.closed || this.waitsForItsStart(timeline)) continue;
      if (timeline.watermark !== undefined) {
        this.drain(timeline);
        continue;
      }
      for (const seq of [...timeline.held.keys()].sort(compare)) {
        const message = timeline.held.get(seq)!;
        timeline.held.delete(seq);
        if (timeline.own.has(seq)) timeline.own.delete(seq);
        else if (!this.isDuplicate(timeline, message)) this.handOver(timeline, message, true);
      }
    }
  }

  private receiveUnnumbered(message: pb.Message): void {
    if (this.seen.isDuplicate(message.id, message.from, message.device, 0n)) {
      this.duplicates++;
      this.acknowledge(message, 0n);
      return;
    }
    if (this.give(message, true)) this.acknowledge(message, 0n);
  }

  /** Pages of `conversation` past `cursor` are coming: live gaps wait for them. */
  beginCatchUp(conversation: string, cursor: bigint, peer = "", group = ""): void {
    this.anchor(conversation, cursor, peer, group);
    this.timeline(conversation).catchingUp = true;
  }

  /** Hand over caught-up messages (oldest first); how many reached the application. */
  catchUpPage(conversation: string, messages: readonly pb.Message[]): number {
    const timeline = this.timeline(conversation);
    let handed = 0;
    for (const message of [...messages].sort((a, b) => compare(a.seq, b.seq))) {
      if (this.closed) break;
      this.learn(timeline, message);
      if (timeline.own.has(message.seq)) {
        timeline.own.delete(message.seq);
        timeline.held.delete(message.seq);
        timeline.dealtWith(message.seq);
        continue;
      }
      if (this.isDuplicate(timeline, message)) {
        this.duplicates++;
        timeline.dealtWith(message.seq);
        continue;
      }
      timeline.held.delete(message.seq);
      if (this.handOver(timeline, message, false)) handed++;
    }
    timeline.advance();
    return handed;
  }

  /** The pull ended; `complete`: every page up to `through` was handed over. */
  endCatchUp(conversation: string, through: bigint, complete: boolean): bigint {
    const timeline = this.timeline(conversation);
    timeline.catchingUp = false;
    if (complete && !timeline.declined && !this.closed) {
      timeline.refusedRounds = 0;
      timeline.skipTo(through);
    } else if (timeline.held.size) {
      timeline.refusedRounds += 1;
    }
    timeline.advance();
    this.drain(timeline);
    return timeline.watermark ?? 0n;
  }

  private isDuplicate(timeline: Timeline, message: pb.Message): boolean {
    if (timeline.watermark !== undefined && message.seq <= timeline.watermark) return true;
    if (timeline.above.has(message.seq)) return true;
    if (this.sending(message)) return true;
    return this.seen.isDuplicate(message.id, message.from, message.device, message.clientSeq);
  }

  private handOver(timeline: Timeline, message: pb.Message, live: boolean): boolean {
    if (!this.give(message, live)) {
      timeline.declined = true;
      return false;
    }
    timeline.above.add(message.seq);
    if (message.seq > timeline.top) timeline.top = message.seq;
    if (!timeline.declined) timeline.advance();
    if (live) this.ack(message, timeline);
    return true;
  }

  private give(message: pb.Message, live: boolean): boolean {
    if (this.closed) return false;
    try {
      this.seen.record(message.id, message.from, message.device, message.clientSeq);
    } catch (error) {
      console.error("cim: could not remember a message", error);
    }
    let taken: boolean | void = true;
    try {
      taken = this.deliver(message, live);
    } catch (error) {
      console.error("cim: a message listener threw", error);
    }
    return taken !== false;
  }

  private ack(message: pb.Message, timeline: Timeline): void {
    const through = timeline.declined ? 0n : (timeline.watermark ?? 0n);
    this.acknowledge(message, through);
  }

  private drain(timeline: Timeline): void {
    while (timeline.held.size && !this.closed) {
      const seq = timeline.lowestHeld();
      if (timeline.watermark !== undefined && seq <= timeline.watermark) {
        timeline.held.delete(seq);
        timeline.own.delete(seq);
        continue;
      }
      if (seq > timeline.top + 1n) break;
      const message = timeline.held.get(seq)!;
      timeline.held.delete(seq);
      if (timeline.own.has(seq)) {
        timeline.own.delete(seq);
        timeline.above.add(seq);
        if (seq > timeline.top) timeline.top = seq;
        timeline.advance();
      } else if (this.isDuplicate(timeline, message)) {
        timeline.dealtWith(seq);
      } else {
        this.handOver(timeline, message, true);
      }
    }
    if (timeline.held.size && !this.closed) this.fillGap(timeline);
  }

  private fillGap(timeline: Timeline): void {
    if (timeline.filling || timeline.catchingUp || !timeline.held.size || this.summaryPending) return;
    const after = timeline.top;
    const before = timeline.lowestHeld();
    if (before <= after + 1n) {
      this.drain(timeline);
      return;
    }
    timeline.filling = true;
    this.fill(timeline.key, timeline.peer, timeline.group, after, before).then(
      (answer) => this.filled(answer, timeline, after, before),
      (error: unknown) => this.fillFailed(error, timeline),
    );
  }

  private filled(answer: pb.HistoryA, timeline: Timeline, after: bigint, before: bigint): void {
    timeline.filling = false;
    if (timeline.catchingUp) return; // the pull brings this range, in order
    if (answer.error) {
      this.fillFailed(new RequestFailed("HISTORY_R", answer.message || answer.error), timeline);
      return;
    }
    timeline.refusedRounds = 0;
    const page = answer.messages.filter((m) => after < m.seq && m.seq < before);
    if (page.length && answer.more) {
      this.pullInstead(timeline); // more than a page: the catch-up brings all of it
      return;
    }
    for (const message of page.sort((a, b) => compare(a.seq, b.seq))) {
      if (this.closed) return;
      this.learn(timeline, message);
      if (this.isDuplicate(timeline, message)) {
        timeline.dealtWith(message.seq);
        continue;
      }
      this.handOver(timeline, message, true);
    }
    if (!timeline.declined) timeline.filled(after, before);
    else if (before - 1n > timeline.top) timeline.top = before - 1n;
    this.drain(timeline);
  }

  private fillFailed(error: unknown, timeline: Timeline): void {
    timeline.filling = false;
    if (timeline.catchingUp) return;
    if (!(error instanceof RequestFailed)) return; // the connection went: the next login's catch-up
    if (forNow(error) && timeline.refusedRounds < MAX_REFUSED_ROUNDS) {
      // The node cannot read now: the conversation's catch-up (retried with its
      // backoff) brings the gap and then what is held, in order.
      timeline.refusedRounds += 1;
      this.pullInstead(timeline);
      return;
    }
    timeline.refusedRounds = 0;
    // Show what came, in order; the watermark stays below the hole, and the
    // conversation's catch-up is asked now (it retries while the node refuses) rather
    // than left to the next login, days away on a steady connection.
    for (const seq of [...timeline.held.keys()].sort(compare)) {
      if (this.closed) return;
      const message = timeline.held.get(seq)!;
      timeline.held.delete(seq);
      if (timeline.own.has(seq)) {
        timeline.own.delete(seq);
        timeline.dealtWith(seq); // not shown back; past the hole all the same
        continue;
      }
      if (!this.isDuplicate(timeline, message)) this.handOver(timeline, message, true);
    }
    if (timeline.watermark !== undefined && timeline.watermark < timeline.top) this.pull(timeline.key);
  }

  /** The conversation's catch-up brings the gap, then what is held, in order; live
   * messages after a gap wait for it meanwhile (`catchingUp`). */
  private pullInstead(timeline: Timeline): void {
    timeline.catchingUp = true;
    this.pull(timeline.key);
  }

  private timeline(conversation: string): Timeline {
    let timeline = this.timelines.get(conversation);
    if (timeline === undefined) this.timelines.set(conversation, (timeline = new Timeline(conversation)));
    return timeline;
  }

  private learn(timeline: Timeline, message: pb.Message): void {
    if (message.group) timeline.group = message.group;
    else if (!timeline.peer) timeline.peer = message.from === this.user ? message.to : message.from;
  }
}
