/**
 * Catching up after a login: the summary first, then pages newest first
 * (cim/client/catch_up.py; design: 离线消息 方案2, 优化方案1).
 *
 * OFFLINE_SUMMARY_R lists the conversations with unread, newest activity first, and
 * the cursors of the others; both anchor the inbox's watermarks. Then each listed
 * conversation is pulled (OFFLINE_R, pages newest first), so the newest page of the
 * newest conversation reaches the application first. Each OFFLINE_R carries the
 * cursors completed so far; OFFLINE_ACK_R with the rest ends the pull. A catch-up
 * whose requests fail on the node's side is started again after a backoff (8 times);
 * one cut by a lost connection waits for the next login.
 */
import { create } from "@bufbuild/protobuf";
import { Backoff, type Clock, type Timer } from "../clock.js";
import { pb } from "../protocol/frames.js";
import { RequestFailed, type Answers } from "./answers.js";
import type { Inbox } from "./inbox.js";

export const MAX_SUMMARY_ROUNDS = 50;
export const MAX_RETRIES = 8;
export const RETRY_BACKOFF = new Backoff(2_000, 60_000, 0.5);
export const MAX_EMPTY_PAGES = 3;

export interface CatchUpResult {
  handed: number;
  conversations: string[];
  summary?: pb.OfflineSummaryA;
}

export class CatchUp {
  private running: Promise<CatchUpResult> | undefined;
  private readonly again = new Set<string | null>();
  private acks: pb.Cursor[] = [];
  private failures = 0;
  private retry: Timer | undefined;
  lastSummary: pb.OfflineSummaryA | undefined;
  /** Told every summary, before its pull (an app's conversation list, unread counts). */
  onSummary: (summary: pb.OfflineSummaryA) => void = () => {};

  constructor(
    private readonly clock: Clock,
    private readonly answers: Answers,
    private readonly inbox: Inbox,
    private readonly maxBytes: () => number,
    readonly ordered = false,
    readonly pageSize = 0,
    private readonly random: () => number = Math.random,
  ) {}

  get isRunning(): boolean {
    return this.running !== undefined;
  }

  /** Catch up on one conversation, or (none) on all after a summary. Never rejects. */
  start(conversation: string | null = null): Promise<CatchUpResult> {
    if (this.inbox.closed) return Promise.resolve({ handed: 0, conversations: [] });
    if (this.running !== undefined) {
      this.again.add(conversation);
      return this.running;
    }
    const run = this.run(conversation).then(
      (result) => {
        this.failures = 0;
        return result;
      },
      (error: unknown) => this.failed(error, conversation),
    );
    this.running = run.then((result) => {
      this.running = undefined;
      if (this.again.size && !this.inbox.closed) {
        const first = this.again.has(null) ? null : [...this.again].sort()[0]!;
        if (first === null) this.again.clear();
        else this.again.delete(first);
        void this.start(first);
      }
      return result;
    });
    return this.running;
  }

  stop(): void {
    this.retry?.cancel();
    this.retry = undefined;
  }

  private failed(error: unknown, conversation: string | null): CatchUpResult {
    this.acks = [];
    if (!(error instanceof RequestFailed) || this.failures >= MAX_RETRIES) {
      return { handed: 0, conversations: [] }; // a lost connection: the next login catches up
    }
    const wait = RETRY_BACKOFF.delay(this.failures, this.random);
    this.failures++;
    this.stop();
    this.retry = this.clock.later(wait, () => {
      this.retry = undefined;
      if (this.answers.connected && !this.inbox.closed) void this.start(conversation);
    });
    return { handed: 0, conversations: [] };
  }

  private async run(conversation: string | null): Promise<CatchUpResult> {
    const result: CatchUpResult = { handed: 0, conversations: [] };
    if (conversation !== null) {
      await this.pullOne(conversation, this.inbox.watermark(conversation) ?? 0n, 0n, result);
    } else {
      await this.all(result);
    }
    await this.finish(result);
    return result;
  }

  private async all(result: CatchUpResult): Promise<void> {
    for (let round = 0; round < MAX_SUMMARY_ROUNDS; round++) {
      const summary = await this.summary();
      result.summary ??= summary;
      const waiting: pb.ConversationSummary[] = [];
      for (const entry of summary.conversations) {
        const shown = this.inbox.watermark(entry.conversation) ?? 0n;
        if (entry.count && shown >= entry.lastSeq) {
          this.acks.push(create(pb.CursorSchema, { conversation: entry.conversation, seq: shown }));
        } else if (entry.count) {
          waiting.push(entry);
        }
      }
      for (const entry of waiting) this.inbox.beginCatchUp(entry.conversation, entry.cursor);
      try {
        while (waiting.length && !this.inbox.closed) {
          const entry = waiting.shift()!;
          await this.pullOne(entry.conversation, entry.cursor, entry.lastSeq, result);
        }
      } finally {
        for (const entry of waiting) this.inbox.endCatchUp(entry.conversation, 0n, false);
      }
      if (!summary.more || !summary.conversations.length || this.inbox.closed) return;
      await this.finish(result);
    }
  }

  /** Ask for the summary and anchor the inbox's watermarks with it. */
  async summary(): Promise<pb.OfflineSummaryA> {
    const request = create(pb.OfflineSummaryRSchema, { maxBytes: this.maxBytes() });
    this.inbox.summaryPending = true;
    let summary: pb.OfflineSummaryA;
    try {
      summary = await this.answers.ask<pb.OfflineSummaryA>(pb.FrameType.OFFLINE_SUMMARY_R, request);
    } catch (error) {
      this.inbox.summaryDone(false);
      throw error;
    }
    this.lastSummary = summary;
    for (const cursor of summary.caughtUp) this.inbox.anchor(cursor.conversation, cursor.seq);
    for (const entry of summary.conversations) {
      this.inbox.anchor(entry.conversation, entry.cursor, entry.peer, entry.group);
    }
    this.inbox.summaryDone(!summary.more);
    try {
      this.onSummary(summary);
    } catch (error) {
      console.error("cim: the summary listener threw", error);
    }
    return summary;
  }

  private async pullOne(conversation: string, cursor: bigint, lastSeq: bigint, result: CatchUpResult): Promise<void> {
    this.inbox.beginCatchUp(conversation, cursor);
    result.conversations.push(conversation);
    const gathered: pb.Message[] = [];
    let through = lastSeq;
    let complete = false;
    let watermark: bigint;
    try {
      let before = 0n;
      let empty = 0;
      while (!this.inbox.closed) {
        const page = await this.page(conversation, before);
        for (const message of page.messages) if (message.seq > through) through = message.seq;
        if (this.ordered) gathered.push(...page.messages);
        else result.handed += this.inbox.catchUpPage(conversation, page.messages);
        empty = page.messages.length ? 0 : empty + 1;
        if (!page.more || !page.nextBefore || empty >= MAX_EMPTY_PAGES) {
          complete = !page.more;
          break;
        }
        before = page.nextBefore;
      }
      if (this.ordered) result.handed += this.inbox.catchUpPage(conversation, gathered);
    } finally {
      watermark = this.inbox.endCatchUp(conversation, through, complete && !this.inbox.closed);
    }
    if (watermark > cursor) this.acks.push(create(pb.CursorSchema, { conversation, seq: watermark }));
  }

  private async page(conversation: string, before: bigint): Promise<pb.OfflineA> {
    const acks = this.acks;
    this.acks = [];
    const request = create(pb.OfflineRSchema, {
      conversation,
      before,
      limit: this.pageSize,
      maxBytes: this.maxBytes(),
      acks,
    });
    try {
      return await this.answers.ask<pb.OfflineA>(pb.FrameType.OFFLINE_R, request);
    } catch (error) {
      this.acks = [...acks, ...this.acks]; // not sent for sure: OFFLINE_ACK_R takes them
      throw error;
    }
  }

  private async finish(result: CatchUpResult): Promise<void> {
    const acks = this.acks;
    this.acks = [];
    if (!acks.length && !result.conversations.length) return;
    await this.answers.ask(pb.FrameType.OFFLINE_ACK_R, create(pb.OfflineAckRSchema, { cursors: acks }));
  }
}
