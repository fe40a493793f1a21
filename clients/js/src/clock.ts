/**
 * Time for the session's timers, injectable so tests run without waiting
 * (`test/support/fake-clock.ts`), and the one backoff policy, as in the Python
 * library (cim/backends/backoff.py): a step that doubles from `initial` to
 * `maximum`, of which `jitter` is random, so clients that lost the same node do not
 * all come back at once.
 */

export interface Timer {
  cancel(): void;
  readonly active: boolean;
}

export interface Clock {
  /** Milliseconds since the Unix epoch. */
  now(): number;
  /** Call `fn` after `ms` milliseconds. */
  later(ms: number, fn: () => void): Timer;
}

export const realClock: Clock = {
  now: () => Date.now(),
  later(ms, fn) {
    let active = true;
    const handle = setTimeout(() => {
      active = false;
      fn();
    }, Math.max(0, ms));
    return {
      cancel() {
        active = false;
        clearTimeout(handle);
      },
      get active() {
        return active;
      },
    };
  },
};

export class Backoff {
  constructor(
    readonly initial: number,
    readonly maximum: number,
    readonly jitter = 0,
    readonly factor = 2,
  ) {
    if (!(initial > 0 && initial <= maximum)) throw new RangeError("backoff needs 0 < initial <= maximum");
    if (jitter < 0 || jitter > 1) throw new RangeError("jitter is a share of the step, from 0 to 1");
  }

  /** The wait (ms) before retry `attempt` (0 for the first), without jitter. */
  step(attempt: number): number {
    return Math.min(this.maximum, this.initial * this.factor ** Math.max(0, attempt));
  }

  /** The wait (ms) before retry `attempt`, jittered by `random` (0..1). */
  delay(attempt: number, random: () => number = Math.random): number {
    const step = this.step(attempt);
    if (!this.jitter) return step;
    return step * (1 - this.jitter) + random() * step * this.jitter;
  }
}

/** The client's reconnect wait: 0.5 s doubling to 30 s, half of it random. */
export const RECONNECT_BACKOFF = new Backoff(500, 30_000, 0.5);
