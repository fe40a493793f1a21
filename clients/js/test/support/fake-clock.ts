// A clock the tests move by hand: no test waits for real time to pass.
import type { Clock, Timer } from "../../src/clock.js";

interface Scheduled {
  at: number;
  order: number;
  fn: () => void;
  active: boolean;
}

export class FakeClock implements Clock {
  private time = 1_796_000_000_000;
  private order = 0;
  private scheduled: Scheduled[] = [];

  now(): number {
    return this.time;
  }

  later(ms: number, fn: () => void): Timer {
    const entry: Scheduled = { at: this.time + Math.max(0, ms), order: this.order++, fn, active: true };
    this.scheduled.push(entry);
    return {
      cancel: () => {
        entry.active = false;
      },
      get active() {
        return entry.active;
      },
    };
  }

  /** Timers still to fire. */
  get pending(): number {
    return this.scheduled.filter((s) => s.active).length;
  }

  /** Move time forward by `ms`, firing what falls due, in order (at most 10,000). */
  advance(ms: number): void {
    const end = this.time + ms;
    for (let fired = 0; fired < 10_000; fired++) {
      this.scheduled = this.scheduled.filter((s) => s.active);
      const due = this.scheduled.filter((s) => s.at <= end).sort((a, b) => a.at - b.at || a.order - b.order)[0];
      if (due === undefined) break;
      this.time = Math.max(this.time, due.at);
      due.active = false;
      due.fn();
    }
    this.time = end;
  }
}

/**
 * Let promises and WebCrypto's work (a thread pool: real time, not the fake clock)
 * settle until `condition` holds; bounded (a few hundred quick turns, then turns of
 * 5 ms: about 10 s on a machine busy with other tests), and fails naming what it
 * waited for. It asserts nothing about time.
 */
export async function until(condition: () => boolean, what: string, turns = 2300): Promise<void> {
  for (let turn = 0; turn < turns; turn++) {
    if (condition()) return;
    await new Promise((resolve) => (turn < 300 ? setImmediate(resolve) : setTimeout(resolve, 5)));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** A few turns of the event loop, for "nothing more happens" checks. */
export async function settle(turns = 50): Promise<void> {
  for (let turn = 0; turn < turns; turn++) await new Promise((resolve) => setImmediate(resolve));
}
