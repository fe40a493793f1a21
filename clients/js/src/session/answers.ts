/**
 * Requests that wait for an answer: deadlines, retries, refusals (cim/client/answers.py).
 *
 * Every request (summary, pulls and their end, ack:R, history, groups, contacts,
 * online, devices, read marks) has a deadline; one without an answer by then goes again after the request
 * backoff, a few times, then fails with RequestTimedOut. An ERROR naming the request
 * ends its wait at once: UNAVAILABLE, RATE_LIMITED and INTERNAL are retried after the
 * node's retry_after_ms or the backoff, whichever is longer; anything else fails it
 * with RequestRefused. Answers are matched by request_id, ack:A by the message id,
 * ONLINE_A (no id) by order. A group `create` is not repeated after a silence: it
 * would make two groups.
 */
import { Backoff, type Clock, type Timer } from "../clock.js";
import { pb } from "../protocol/frames.js";

const T = pb.FrameType;

export const ANSWER_TYPES = new Map<number, number>([
  [T.ONLINE_R, T.ONLINE_A],
  [T.DEVICES_R, T.DEVICES_A],
  [T.OFFLINE_R, T.OFFLINE_A],
  [T.OFFLINE_ACK_R, T.OFFLINE_ACK_A],
  [T.OFFLINE_SUMMARY_R, T.OFFLINE_SUMMARY_A],
  [T.HISTORY_R, T.HISTORY_A],
  [T.GROUP_R, T.GROUP_A],
  [T.CONTACTS_R, T.CONTACTS_A],
  [T.ACK_R, T.ACK_A],
  [T.APP_STATE_R, T.APP_STATE_A],
  [T.TYPING_R, T.TYPING_A],
  [T.CHANGE_R, T.CHANGE_A],
  [T.READ_R, T.READ_A],
  [T.READERS_R, T.READERS_A],
]);
const ANSWERS = new Set(ANSWER_TYPES.values());
const BY_ORDER = new Set<number>([T.ONLINE_A]);
const BY_MESSAGE = new Set<number>([T.ACK_A]);
export const RETRYABLE = new Set<number>([pb.Error_Code.UNAVAILABLE, pb.Error_Code.RATE_LIMITED, pb.Error_Code.INTERNAL]);

function frameName(type: number): string {
  return pb.FrameType[type] ?? String(type);
}

/** A request got no usable answer (refused, or silent past its retries). */
export class RequestFailed extends Error {
  override name = "RequestFailed";
  /** `reason`: the ERROR's machine-readable cause, where it gives one (CHANGE_R's). */
  constructor(
    readonly what: string,
    readonly why: string,
    readonly code = 0,
    readonly reason = "",
  ) {
    super(`${what}: ${why}`);
  }
}

/** The node refused with an ERROR a retry cannot change. */
export class RequestRefused extends RequestFailed {
  override name = "RequestRefused";
}

/** No answer within the deadline, however many times the request went. */
export class RequestTimedOut extends RequestFailed {
  override name = "RequestTimedOut";
}

/** The connection went while the request waited (the session asks again later). */
export class ConnectionLost extends Error {
  override name = "ConnectionLost";
}

export interface RequestPolicy {
  /** Per attempt, ms. */
  deadline: number;
  attempts: number;
  backoff: Backoff;
}

export const DEFAULT_REQUEST_POLICY: RequestPolicy = {
  deadline: 10_000,
  attempts: 4,
  backoff: new Backoff(500, 8_000, 0.5),
};

export interface Sender {
  send(type: number, message: object): void;
}

interface Pending {
  type: number;
  request: { requestId?: bigint; msgId?: bigint };
  answerType: number;
  key: bigint;
  resolve: (answer: never) => void;
  reject: (error: Error) => void;
  retryOnDeadline: boolean;
  attempts: number;
  timer: Timer | undefined;
  inFlight: boolean;
}

export class Answers {
  private readonly pending = new Map<number, Map<bigint, Pending>>();
  private nextId = 1n;
  /** How many times a request went again (deadline or refusal). */
  retries = 0;

  constructor(
    private readonly clock: Clock,
    private readonly connection: () => Sender | undefined,
    readonly policy: RequestPolicy = DEFAULT_REQUEST_POLICY,
    private readonly random: () => number = Math.random,
  ) {}

  get size(): number {
    let total = 0;
    for (const queue of this.pending.values()) total += queue.size;
    return total;
  }

  get connected(): boolean {
    return this.connection() !== undefined;
  }

  /** Send `request` (a message of the frame `type`); resolves with its answer. */
  ask<A>(type: number, request: object, retryOnDeadline = true): Promise<A> {
    if (this.connection() === undefined) return Promise.reject(new ConnectionLost("not connected"));
    const answerType = ANSWER_TYPES.get(type);
    if (answerType === undefined) throw new Error(`${frameName(type)} is not a request`);
    const fields = request as Pending["request"];
    let key: bigint;
    if (BY_MESSAGE.has(answerType)) {
      key = fields.msgId ?? 0n;
    } else {
      key = this.nextId++;
      if (!BY_ORDER.has(answerType)) fields.requestId = key;
    }
    let queue = this.pending.get(answerType);
    if (queue === undefined) this.pending.set(answerType, (queue = new Map()));
    const previous = queue.get(key);
    return new Promise<A>((resolve, reject) => {
      const pending: Pending = {
        type,
        request: fields,
        answerType,
        key,
        resolve: resolve as (answer: never) => void,
        reject,
        retryOnDeadline,
        attempts: 0,
        timer: undefined,
        inFlight: false,
      };
      if (previous !== undefined) {
        // The same ack:R again: the newer one supersedes it, both learn its answer.
        previous.timer?.cancel();
        pending.resolve = ((answer: never) => {
          previous.resolve(answer);
          resolve(answer as A);
        }) as (answer: never) => void;
        pending.reject = (error) => {
          previous.reject(error);
          reject(error);
        };
      }
      queue.set(key, pending);
      this.send(pending);
    });
  }

  group(request: pb.GroupRequest): Promise<pb.GroupAnswer> {
    return this.ask(T.GROUP_R, request, request.op.case !== "create");
  }

  private send(pending: Pending): void {
    const connection = this.connection();
    if (connection === undefined) {
      this.fail(pending, new ConnectionLost("not connected"));
      return;
    }
    pending.attempts++;
    pending.inFlight = true;
    pending.timer = this.clock.later(this.policy.deadline, () => this.expired(pending));
    connection.send(pending.type, pending.request);
  }

  private expired(pending: Pending): void {
    pending.timer = undefined;
    pending.inFlight = false;
    const what = frameName(pending.type);
    const seconds = this.policy.deadline / 1000;
    if (!pending.retryOnDeadline) {
      this.fail(pending, new RequestTimedOut(what, `no answer within ${seconds} s (not repeated: not idempotent)`));
    } else if (pending.attempts >= this.policy.attempts) {
      this.fail(pending, new RequestTimedOut(what, `no answer within ${seconds} s, ${pending.attempts} times`));
    } else {
      this.again(pending, 0);
    }
  }

  private again(pending: Pending, atLeast: number): void {
    this.retries++;
    const wait = Math.max(atLeast, this.policy.backoff.delay(pending.attempts - 1, this.random));
    pending.timer = this.clock.later(wait, () => {
      pending.timer = undefined;
      if (this.pending.get(pending.answerType)?.get(pending.key) === pending) this.send(pending);
    });
  }

  /** Hand an answer frame to its request; false if the frame is not an answer. */
  answer(type: number, message: object): boolean {
    if (!ANSWERS.has(type)) return false;
    const fields = message as { requestId?: bigint; msgId?: bigint; error?: string; message?: string };
    let pending: Pending | undefined;
    if (BY_MESSAGE.has(type)) pending = this.find(type, fields.msgId ?? 0n);
    else if (BY_ORDER.has(type)) pending = this.oldest(type);
    else pending = fields.requestId ? this.find(type, fields.requestId) : this.oldest(type);
    if (pending === undefined) return true; // late: nothing waits for it
    if (type === T.HISTORY_A && fields.error === "unavailable") {
      this.refusedNow(pending, pb.Error_Code.UNAVAILABLE, fields.message ?? "", 0);
      return true;
    }
    this.forget(pending);
    pending.resolve(message as never);
    return true;
  }

  /** An ERROR frame: ends the wait of the request it names; false if it names none. */
  refused(error: pb.Error): boolean {
    const answerType = ANSWER_TYPES.get(error.requestType);
    if (answerType === undefined) return false;
    const pending =
      error.requestId && !BY_ORDER.has(answerType) && !BY_MESSAGE.has(answerType)
        ? this.find(answerType, error.requestId)
        : this.oldest(answerType, true);
    if (pending !== undefined) this.refusedNow(pending, error.code, error.message, error.retryAfterMs, error.reason);
    return true;
  }

  private refusedNow(pending: Pending, code: number, message: string, retryMs: number, reason = ""): void {
    pending.timer?.cancel();
    pending.timer = undefined;
    pending.inFlight = false;
    const codeName = pb.Error_Code[code] ?? String(code);
    const why = message ? `${codeName}: ${message}` : codeName;
    if (RETRYABLE.has(code) && pending.attempts < this.policy.attempts) {
      this.again(pending, retryMs);
      return;
    }
    this.fail(pending, new RequestRefused(frameName(pending.type), why, code, reason));
  }

  private find(answerType: number, key: bigint): Pending | undefined {
    return this.pending.get(answerType)?.get(key);
  }

  private oldest(answerType: number, inFlight = false): Pending | undefined {
    for (const pending of this.pending.get(answerType)?.values() ?? []) {
      if (pending.inFlight || !inFlight) return pending;
    }
    return undefined;
  }

  private fail(pending: Pending, error: Error): void {
    this.forget(pending);
    pending.reject(error);
  }

  private forget(pending: Pending): void {
    pending.timer?.cancel();
    pending.timer = undefined;
    const queue = this.pending.get(pending.answerType);
    if (queue?.get(pending.key) === pending) queue.delete(pending.key);
  }

  /** Every request in flight (or waiting to go again) fails. */
  connectionLost(why = "the connection closed"): void {
    const everything = [...this.pending.values()].flatMap((queue) => [...queue.values()]);
    for (const pending of everything) this.fail(pending, new ConnectionLost(why));
  }
}
