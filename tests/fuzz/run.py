"""``make fuzz``: the frame fuzzer for a million inputs (or as many as you ask for).

    python -m tests.fuzz.run --inputs 1000000 --seed 1

Inputs alternate between the two cipher suites in chunks, each suite on one
long-lived node (its state must stay bounded across hundreds of thousands of hostile
sessions). A seeded generator, not hypothesis: at this volume hypothesis' bookkeeping
per example would cost more than the node does. The bounded CI run with hypothesis
(and shrinking) is tests/unit/test_frame_fuzz.py.

Progress goes to stderr every ``--report-every`` inputs (inputs, rate, resident
memory); the end prints the counts per suite and in all, and the first failures
with their inputs and tracebacks. The exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time

from tests.fuzz.frames import RandomDraws, draw_action
from tests.fuzz.target import FrameFuzzTarget, Tally

SUITES = ("chacha20-poly1305", "rc4-hmac-sha256")


def resident_mib() -> float:
    """Resident memory now (not the peak), from /proc; the peak where that is absent."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=10_000, help="inputs per suite turn")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: no)")
    parser.add_argument("--report-every", type=int, default=50_000)
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="cim-fuzz-")
    targets = {suite: FrameFuzzTarget(f"{workdir}/{suite}", suite) for suite in SUITES}
    draws = {suite: RandomDraws(args.seed * 2 + n) for n, suite in enumerate(SUITES)}
    started = time.monotonic()
    done = 0
    next_report = args.report_every
    rss_start: float | None = None
    try:
        while done < args.inputs:
            for suite in SUITES:
                target, source = targets[suite], draws[suite]
                for _ in range(min(args.chunk, args.inputs - done)):
                    target.send(draw_action(source, target.max_frame_size))
                    done += 1
                if rss_start is None:
                    rss_start = resident_mib()
                if done >= next_report:
                    next_report += args.report_every
                    elapsed = time.monotonic() - started
                    print(
                        f"[fuzz] {done} inputs in {elapsed:.0f} s ({done / elapsed:.0f}/s), "
                        f"resident {resident_mib():.1f} MiB, "
                        + " ".join(f"{s}: {targets[s].tally.summary()}" for s in SUITES),
                        file=sys.stderr,
                        flush=True,
                    )
                if done >= args.inputs or (
                    args.seconds and time.monotonic() - started > args.seconds
                ):
                    break
            if args.seconds and time.monotonic() - started > args.seconds:
                break
    finally:
        for target in targets.values():
            target.close()
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    total = Tally()
    for suite in SUITES:
        tally = targets[suite].tally
        print(f"{suite}: {tally.summary()}")
        for name in ("inputs", "requests", "answered", "closed", "sessions"):
            setattr(total, name, getattr(total, name) + getattr(tally, name))
        total.tracebacks += tally.tracebacks
        total.unanswered += tally.unanswered
        total.examples += tally.examples
    print(f"total: {total.summary()}")
    print(
        f"seed {args.seed}, {elapsed:.0f} s, {total.inputs / max(elapsed, 1e-9):.0f} inputs/s, "
        f"resident memory {rss_start or 0:.1f} MiB after the first chunk, "
        f"{resident_mib():.1f} MiB at the end"
    )
    for example in total.examples[:10]:
        print("----")
        print(example)
    return 1 if total.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
