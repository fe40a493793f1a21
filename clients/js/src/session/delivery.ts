/**
 * Reliable sending: the outbox (cim/client/delivery.py; design: 等待ack队列, 失败重传).
 *
 * Every sent message waits here for its ack:N and ends exactly once: delivered,
 * stored, accepted (a group post) or failed with a reason. `auto` resends the same
 * msg:R (same client_seq: the node and the receiver deduplicate it) after 10, 40 and
 * 100 s and reports failure at 160 s; a reconnect resends everything waiting, in
 * order. `manual` reports failure after 10 s or when the connection drops, and
 * `resend` is the user's retry. RATE_LIMITED / UNAVAILABLE refusals pace the
 * conversation (pacing.ts); BAD_REQUEST and FORBIDDEN are final.
 */
import { Backoff, type Clock, type Timer } from "../clock.js";
import { pb } from "../protocol/frames.js";
import { Pacing, type Conversation } from "./pacing.js";

export type RetryMode = "auto" | "manual";
export type DeliveryStatus = "delivered" | "stored" | "accepted" | "failed";

export const STATUS_NAMES = new Map<number, DeliveryStatus>([
  [pb.DeliveryStatus.DELIVERED, "delivered"],
  [pb.DeliveryStatus.STORED, "stored"],
  [pb.DeliveryStatus.ACCEPTED, "accepted"],
  [pb.DeliveryStatus.FAILED, "failed"],
]);
export const REASON_CONNECTION_CLOSED = "the connection closed before the receiver acknowledged";
const FINAL_REFUSALS = new Set<number>([pb.Error_Code.BAD_REQUEST, pb.Error_Code.FORBIDDEN]);
const PACED = new Set<number>([pb.Error_Code.RATE_LIMITED, pb.Error_Code.UNAVAILABLE]);

/** The wait before a msg:R refused UNAVAILABLE goes again (ms). */
export const UNAVAILABLE_BACKOFF = new Backoff(200, 5_000, 0.5);

/** The end of one sent message. */
export interface DeliveryOutcome {
  clientSeq: bigint;
  msgId: bigint;
  /** The receiver, or the group id. */
  to: string;
  status: DeliveryStatus;
  reason: string;
}

export class RetryPolicy {
  /** `delays` (ms): the waits for ack:N; each but the last ends in a resend (auto). */
  constructor(
    readonly mode: RetryMode = "auto",
    readonly delays: readonly number[] = [10_000, 30_000, 60_000],
    readonly finalWait?: number,
  ) {
    if (mode !== "auto" && mode !== "manual") throw new RangeError(`retry must be auto or manual, not ${mode}`);
    if (!delays.length || delays.some((d) => d <= 0)) throw new RangeError("retry delays must be positive");
  }

  get waits(): number[] {
    if (this.mode === "manual") return [this.delays[0]!];
    return [...this.delays, this.finalWait ?? this.delays[this.delays.length - 1]!];
  }
}

export function conversationOf(message: pb.Message): Conversation {
  return message.group ? `group:${message.group}` : `user:${message.to}`;
}

interface Waiting {
  message: pb.Message;
  to: string;
  waiters: ((outcome: DeliveryOutcome) => void)[];
  msgId: bigint;
  stage: number;
  sends: number;
  refusals: number;
  timer: Timer | undefined;
}

export class Outbox {
  private readonly waitingBySeq = new Map<bigint, Waiting>();
  private readonly failedBySeq = new Map<bigint, { message: pb.Message; to: string }>();
  readonly pacing: Pacing;

  constructor(
    private readonly clock: Clock,
    private readonly transmit: (message: pb.Message) => boolean,
    private readonly report: (outcome: DeliveryOutcome) => void,
    readonly policy: RetryPolicy = new RetryPolicy(),
    private readonly keepFailed = 1000,
    private readonly random: () => number = Math.random,
  ) {
    this.pacing = new Pacing(clock, (seq) => this.sendPaced(seq));
  }

  get size(): number {
    return this.waitingBySeq.size;
  }

  /** client_seq of every message waiting for ack:N, in order. */
  waiting(): bigint[] {
    return [...this.waitingBySeq.keys()].sort(compare);
  }

  isWaiting(clientSeq: bigint): boolean {
    return this.waitingBySeq.has(clientSeq);
  }

  /** client_seq of the failed messages `resend` still accepts, oldest first. */
  failed(): bigint[] {
    return [...this.failedBySeq.keys()];
  }

  /** Send a numbered message; `refuse` ends it failed at once with that reason. */
  add(message: pb.Message, refuse?: string): Promise<DeliveryOutcome> {
    const to = message.to || message.group;
    return new Promise((resolve) => {
      const entry = newEntry(message, to, resolve);
      if (refuse !== undefined) {
        this.finish(entry, outcomeOf(message.clientSeq, 0n, to, "failed", refuse));
        return;
      }
      this.start(entry);
    });
  }

  /** Send again with the same client_seq; throws for a sequence it does not know. */
  resend(clientSeq: bigint): Promise<DeliveryOutcome> {
    const entry = this.waitingBySeq.get(clientSeq);
    if (entry !== undefined) {
      return new Promise((resolve) => {
        entry.waiters.push(resolve);
        this.send(entry);
      });
    }
    const failed = this.failedBySeq.get(clientSeq);
    if (failed === undefined) throw new RangeError(`no waiting or failed message ${clientSeq}`);
    this.failedBySeq.delete(clientSeq);
    return new Promise((resolve) => this.start(newEntry(failed.message, failed.to, resolve)));
  }

  private start(entry: Waiting): void {
    this.waitingBySeq.set(entry.message.clientSeq, entry);
    if (!this.send(entry) && this.policy.mode === "manual") {
      this.fail(entry, "not connected");
      return;
    }
    this.arm(entry);
  }

  private send(entry: Waiting): boolean {
    if (this.pacing.holds(conversationOf(entry.message), entry.message.clientSeq)) return true;
    const sent = this.transmit(entry.message);
    if (sent) entry.sends++;
    return sent;
  }

  private sendPaced(clientSeq: bigint): void {
    const entry = this.waitingBySeq.get(clientSeq);
    if (entry !== undefined && this.transmit(entry.message)) entry.sends++;
  }

  private arm(entry: Waiting): void {
    entry.timer = this.clock.later(this.policy.waits[entry.stage]!, () => this.expired(entry));
  }

  private expired(entry: Waiting): void {
    entry.timer = undefined;
    if (this.waitingBySeq.get(entry.message.clientSeq) !== entry) return;
    const waits = this.policy.waits;
    entry.stage++;
    if (entry.stage >= waits.length) {
      const why =
        this.policy.mode === "manual"
          ? `no ack:N within ${waits[0]! / 1000} s`
          : `no ack:N within ${waits.reduce((a, b) => a + b, 0) / 1000} s (${entry.sends} sends)`;
      this.fail(entry, why);
      return;
    }
    this.send(entry); // skipped while disconnected; the reconnect resends
    this.arm(entry);
  }

  /** msg:A: the node took the message and named it. */
  taken(answer: pb.MsgA): void {
    const entry = this.waitingBySeq.get(answer.clientSeq);
    if (entry === undefined) return;
    entry.msgId = answer.msgId;
    entry.refusals = 0;
    this.pacing.taken(conversationOf(entry.message), answer.clientSeq);
  }

  /** ack:N: the final outcome. */
  acknowledged(ack: pb.AckN): void {
    const entry = this.waitingBySeq.get(ack.clientSeq);
    if (entry === undefined) return; // late or repeated
    const status = STATUS_NAMES.get(ack.status) ?? "failed";
    this.finish(entry, outcomeOf(ack.clientSeq, ack.msgId || entry.msgId, ack.to || entry.to, status, ack.reason));
  }

  /** ERROR about a msg:R. */
  refused(error: pb.Error): void {
    const entry = this.waitingBySeq.get(error.clientSeq);
    if (entry === undefined || (error.requestType !== pb.FrameType.MSG_R && error.requestType !== 0)) return;
    const retryAfter = error.retryAfterMs;
    const conversation = conversationOf(entry.message);
    if (error.code === pb.Error_Code.UNAVAILABLE) {
      const wait = Math.max(retryAfter, UNAVAILABLE_BACKOFF.delay(entry.refusals, this.random));
      entry.refusals++;
      this.pacing.refused(conversation, error.clientSeq, wait, 0);
      return;
    }
    if (retryAfter && PACED.has(error.code)) {
      this.pacing.refused(conversation, error.clientSeq, retryAfter);
      return;
    }
    if (FINAL_REFUSALS.has(error.code) || this.policy.mode === "manual") {
      this.fail(entry, error.message || (pb.Error_Code[error.code] ?? String(error.code)));
    }
  }

  /** A new connection: in auto, everything still waiting goes again, in order. */
  connectionMade(): void {
    if (this.policy.mode !== "auto") return;
    for (const seq of this.waiting()) this.send(this.waitingBySeq.get(seq)!);
    this.pacing.reconnected();
  }

  /** In manual, the connection was the messages' only chance. */
  connectionLost(reason = REASON_CONNECTION_CLOSED): void {
    if (this.policy.mode === "manual") this.failAll(reason);
  }

  failAll(reason: string): void {
    for (const seq of this.waiting()) {
      const entry = this.waitingBySeq.get(seq);
      if (entry !== undefined) this.fail(entry, reason);
    }
  }

  private fail(entry: Waiting, reason: string): void {
    this.finish(entry, outcomeOf(entry.message.clientSeq, entry.msgId, entry.to, "failed", reason));
  }

  private finish(entry: Waiting, outcome: DeliveryOutcome): void {
    const seq = entry.message.clientSeq;
    if (this.waitingBySeq.get(seq) === entry) this.waitingBySeq.delete(seq);
    entry.timer?.cancel();
    entry.timer = undefined;
    this.pacing.ended(conversationOf(entry.message), seq);
    if (outcome.status === "failed") {
      this.failedBySeq.delete(seq);
      this.failedBySeq.set(seq, { message: entry.message, to: entry.to });
      while (this.failedBySeq.size > this.keepFailed) {
        this.failedBySeq.delete(this.failedBySeq.keys().next().value!);
      }
    }
    try {
      this.report(outcome);
    } catch (error) {
      console.error("cim: the outcome listener threw", error);
    }
    for (const waiter of entry.waiters) waiter(outcome);
  }
}

function newEntry(message: pb.Message, to: string, resolve: (o: DeliveryOutcome) => void): Waiting {
  return { message, to, waiters: [resolve], msgId: 0n, stage: 0, sends: 0, refusals: 0, timer: undefined };
}

function outcomeOf(
  clientSeq: bigint,
  msgId: bigint,
  to: string,
  status: DeliveryStatus,
  reason: string,
): DeliveryOutcome {
  return { clientSeq, msgId, to, status, reason };
}

export function compare(a: bigint, b: bigint): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
