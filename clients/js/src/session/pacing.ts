/**
 * Conversations the node asked to slow down (cim/client/pacing.py).
 *
 * A msg:R refused RATE_LIMITED or UNAVAILABLE with retry_after_ms was not taken, and
 * the node takes no later message of that conversation until it is. So here too: the
 * refused message and every later one of its conversation are held; after the wait
 * the oldest goes alone (the probe); once taken, the next follows after the last
 * retry-after (or at once for UNAVAILABLE, `spacing` 0). Other conversations flow.
 */
import type { Clock, Timer } from "../clock.js";

/** "user:NAME" or "group:ID": what the node keeps in order. */
export type Conversation = string;

interface Pause {
  held: Set<bigint>;
  probe: bigint | undefined;
  until: number;
  interval: number;
  timer: Timer | undefined;
}

function minOf(values: Iterable<bigint>): bigint {
  let best: bigint | undefined;
  for (const value of values) if (best === undefined || value < best) best = value;
  if (best === undefined) throw new Error("empty");
  return best;
}

export class Pacing {
  private readonly pauses = new Map<Conversation, Pause>();

  constructor(
    private readonly clock: Clock,
    private readonly send: (seq: bigint) => void,
  ) {}

  get size(): number {
    return this.pauses.size;
  }

  /** Whether `seq` must not be transmitted now (a new message of a paced conversation is held). */
  holds(conversation: Conversation, seq: bigint): boolean {
    const pause = this.pauses.get(conversation);
    if (pause === undefined || seq === pause.probe) return false;
    pause.held.add(seq);
    return true;
  }

  /** The node refused `seq` for now (ms): hold it and what follows that long. */
  refused(conversation: Conversation, seq: bigint, retryAfter: number, spacing?: number): void {
    let pause = this.pauses.get(conversation);
    if (pause === undefined) {
      pause = { held: new Set(), probe: undefined, until: 0, interval: 0, timer: undefined };
      this.pauses.set(conversation, pause);
    }
    if (pause.probe === seq) pause.probe = undefined;
    pause.held.add(seq);
    pause.interval = spacing ?? retryAfter;
    const now = this.clock.now();
    const until = now + retryAfter;
    if (until > pause.until || pause.timer === undefined) {
      pause.until = Math.max(until, pause.until);
      pause.timer?.cancel();
      pause.timer = this.clock.later(pause.until - now, () => this.waited(conversation));
    }
  }

  /** The node took `seq` (or answered it finally): the next held one may go. */
  taken(conversation: Conversation, seq: bigint): void {
    const pause = this.pauses.get(conversation);
    if (pause === undefined) return;
    pause.held.delete(seq);
    if (pause.probe !== seq) return;
    pause.probe = undefined;
    if (pause.held.size && pause.timer === undefined && !pause.interval) {
      const held = [...pause.held].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      pause.held.clear();
      this.end(conversation, pause);
      for (const next of held) this.send(next);
    } else if (pause.held.size && pause.timer === undefined) {
      pause.timer = this.clock.later(pause.interval, () => this.waited(conversation));
    } else {
      this.next(conversation, pause);
    }
  }

  /** `seq` left the outbox (failed, stopped): it holds nothing back any more. */
  ended(conversation: Conversation, seq: bigint): void {
    this.taken(conversation, seq);
    const pause = this.pauses.get(conversation);
    if (pause !== undefined && !pause.held.size && pause.probe === undefined) this.end(conversation, pause);
  }

  /** A new connection: a conversation whose wait ended while disconnected goes on. */
  reconnected(): void {
    for (const [conversation, pause] of [...this.pauses]) {
      if (pause.timer === undefined && pause.probe === undefined) this.next(conversation, pause);
    }
  }

  stop(): void {
    for (const pause of this.pauses.values()) pause.timer?.cancel();
    this.pauses.clear();
  }

  private waited(conversation: Conversation): void {
    const pause = this.pauses.get(conversation);
    if (pause === undefined) return;
    pause.timer = undefined;
    if (pause.probe === undefined) this.next(conversation, pause);
  }

  private next(conversation: Conversation, pause: Pause): void {
    if (pause.timer !== undefined) return;
    if (!pause.held.size) {
      this.end(conversation, pause);
      return;
    }
    pause.probe = minOf(pause.held);
    pause.held.delete(pause.probe);
    this.send(pause.probe);
  }

  private end(conversation: Conversation, pause: Pause): void {
    pause.timer?.cancel();
    pause.timer = undefined;
    if (this.pauses.get(conversation) === pause) this.pauses.delete(conversation);
  }
}
