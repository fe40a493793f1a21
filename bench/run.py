"""``python -m bench.run --quick|--full``: run the scenarios, print the table, save results.

``make bench`` runs the quick plan (a few minutes; prints the table, writes the raw
JSON under ``bench/results/``); ``make bench-full`` runs everything and regenerates
``docs/benchmarks.md``. The daemon is pinned to core 0 and the generator (and this
script, which mostly sleeps) to core 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import report, scenarios
from bench.daemon import ROOT

RESULTS_DIR = os.path.join(ROOT, "bench", "results")
DOCS_PATH = os.path.join(ROOT, "docs", "benchmarks.md")
SCENARIOS = ("idle", "one_to_one", "churn")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="plan", const="quick")
    size.add_argument("--full", action="store_const", dest="plan", const="full")
    parser.set_defaults(plan="quick")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run (default: all of {', '.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="run the daemon from this checkout instead (to measure a hot-path change)",
    )
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite docs/benchmarks.md (default: only with --full)",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy the daemon during 1:1 saturation (default: only with --full)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the daemons' data directories")
    parser.add_argument(
        "--report",
        metavar="JSON",
        help="run nothing: print the table of a saved run (and with --docs, rewrite the docs)",
    )
    parser.add_argument("--note", action="append", default=[], help="a note for the report")
    return parser.parse_args(argv)


def pin_to_generator_core() -> list[str]:
    """This script sleeps most of the time, but never on the daemon's core."""
    notes = []
    cores = os.cpu_count() or 1
    if cores < 2:
        notes.append("only one core: daemon and generator share it; figures are not comparable")
        return notes
    try:
        os.sched_setaffinity(0, {scenarios.GENERATOR_CPU})
    except (AttributeError, OSError) as exc:
        notes.append(f"could not pin the benchmark script: {exc}")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as handle:
            saved = json.load(handle)
        saved["notes"] = [*saved.get("notes", []), *args.note]
        print(report.table(saved))
        if args.docs:
            report.write_markdown(saved, DOCS_PATH)
            print(f"rewrote {os.path.relpath(DOCS_PATH, ROOT)}")
        return 0
    plan = scenarios.FULL if args.plan == "full" else scenarios.QUICK
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        print(f"bench: unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    write_docs = args.docs if args.docs is not None else plan.name == "full"
    profile_on = args.profile if args.profile is not None else plan.name == "full"
    if profile_on and plan.profile_seconds <= 0:
        plan = scenarios.Plan(**{**scenarios.plan_dict(plan), "profile_seconds": 8.0})

    started = datetime.datetime.now(datetime.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    run_dir = os.path.join(RESULTS_DIR, f"{stamp}-{plan.name}")
    os.makedirs(run_dir, exist_ok=True)
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {message}", flush=True)

    ctx = scenarios.Context(run_dir, log, source=args.source, keep=args.keep)
    notes = pin_to_generator_core() + list(args.note)
    if args.source:
        notes.append(f"daemon run from {args.source}")
    results: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M"),
        "plan": scenarios.plan_dict(plan),
        "meta": report.machine_info(),
        "notes": notes,
    }

    def attempt(name: str, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except Exception as exc:
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}

    if "idle" in wanted:
        results["idle"] = []
        for count in plan.idle_counts:

            def run_idle(count: int = count) -> dict[str, Any]:
                return scenarios.idle(ctx, plan, count)

            results["idle"].append({"connections": count, **attempt(f"idle {count}", run_idle)})
    if "one_to_one" in wanted:
        profiler = scenarios.py_spy_profiler(run_dir, log) if profile_on else None
        results["one_to_one"] = attempt("1:1", lambda: scenarios.one_to_one(ctx, plan, profiler))
    if "churn" in wanted:
        results["churn"] = attempt("churn", lambda: scenarios.churn(ctx, plan))
    results["seconds"] = time.monotonic() - began

    raw_path = os.path.join(RESULTS_DIR, f"{stamp}-{plan.name}.json")
    with open(raw_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    print()
    print(report.table(results))
    print(f"\nraw results: {os.path.relpath(raw_path, ROOT)}")
    if write_docs:
        report.write_markdown(results, DOCS_PATH)
        print(f"rewrote {os.path.relpath(DOCS_PATH, ROOT)}")
    failed = [
        name for name, value in results.items() if isinstance(value, dict) and "error" in value
    ]
    failed += [f"idle {r.get('connections')}" for r in results.get("idle", []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
