"""``python -m bench.run --quick|--full``: run the scenarios, print the table, save results.

``make bench`` runs the quick plan (a few minutes; prints the table, writes the raw
JSON under ``bench/results/``); ``make bench-full`` runs everything and regenerates
``docs/benchmarks.md``. The daemon is pinned to core 0 and the generator (and this
script, which mostly sleeps) to core 1.

``backends`` (figure 6) runs the 1:1, group and offline scenarios again on a daemon
using the machine's PostgreSQL, Redis and RabbitMQ; it is part of ``--full`` and can
be asked for with ``--only backends`` (or ``--backends``) in either plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import (
    catch_up,
    distributed,
    gateway,
    profiling,
    push_outage,
    report,
    scenarios,
    steady,
    steps,
)
from bench.daemon import ROOT

RESULTS_DIR = os.path.join(ROOT, "bench", "results")
DOCS_PATH = os.path.join(ROOT, "docs", "benchmarks.md")
SCENARIOS = (
    "idle",
    "one_to_one",
    "steady",
    "group",
    "offline",
    "catch_up",
    "churn",
    "backends",
    "gateway",
    "push_outage",
    "distributed",
)
QUICK_SCENARIOS = ("idle", "one_to_one", "steady", "group", "offline", "catch_up", "churn")
"""The quick plan leaves out the external backends (they need the services) and the
WebSocket gateway beside TCP (figure 9, bench.gateway: a minute more) and the push
provider outage (figure 10, bench.push_outage: two minutes more), and one node and two
on PostgreSQL + Redis + RabbitMQ + ZooKeeper (figure 11, bench.distributed: issue #20)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="plan", const="quick")
    size.add_argument("--full", action="store_const", dest="plan", const="full")
    parser.set_defaults(plan="quick")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated scenarios to run, of {', '.join(SCENARIOS)} (default: all "
        "with --full; all but backends with --quick)",
    )
    parser.add_argument(
        "--backends",
        action="store_true",
        help="add the external backends (figure 6) to the scenarios run",
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
        os.sched_setaffinity(0, {steps.GENERATOR_CPU})
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
    default = SCENARIOS if plan.name == "full" else QUICK_SCENARIOS
    only = args.only if args.only is not None else ",".join(default)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    if args.backends and "backends" not in wanted:
        wanted.append("backends")
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
        profiler = profiling.py_spy_profiler(run_dir, log) if profile_on else None
        results["one_to_one"] = attempt("1:1", lambda: scenarios.one_to_one(ctx, plan, profiler))
    run_steady(ctx, plan, wanted, results, attempt)
    if "group" in wanted:
        results["group"] = attempt("group", lambda: scenarios.group(ctx, plan))
    if "offline" in wanted:
        results["offline"] = attempt("offline", lambda: scenarios.offline(ctx, plan))
    if "catch_up" in wanted:
        results["catch_up"] = attempt("catch-up", lambda: catch_up.catch_up(ctx, plan))
    if "churn" in wanted:
        results["churn"] = attempt("churn", lambda: scenarios.churn(ctx, plan))
    if "backends" in wanted:
        results["backends"] = run_external(ctx, plan, attempt)
    if "gateway" in wanted:
        results["gateway"] = attempt("gateway", lambda: gateway.gateway(ctx, plan))
    if "push_outage" in wanted:
        results["push_outage"] = attempt("push outage", lambda: push_outage.push_outage(ctx, plan))
    if "distributed" in wanted:
        results["distributed"] = attempt("distributed", lambda: distributed.distributed(ctx, plan))
    results["notes"] += ctx.notes
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
    failed += [
        f"backends {name}"
        for name, value in results.get("backends", {}).items()
        if isinstance(value, dict) and "error" in value
    ]
    failed += [f"idle {r.get('connections')}" for r in results.get("idle", []) if "error" in r]
    return 1 if failed else 0


def run_steady(
    ctx: scenarios.Context,
    plan: scenarios.Plan,
    wanted: list[str],
    results: dict[str, Any],
    attempt: Callable[[str, Callable[[], Any]], Any],
) -> None:
    """Issue #20: a steady 2,000 msg/s on the shipped configuration (bench.steady)."""
    if "steady" in wanted:
        results["steady"] = attempt("steady", lambda: steady.steady(ctx, plan))


def run_external(
    ctx: scenarios.Context, plan: scenarios.Plan, attempt: Callable[[str, Callable[[], Any]], Any]
) -> dict[str, Any]:
    """Figure 6: the same scenarios on PostgreSQL + Redis + RabbitMQ.

    1:1 runs chacha20-poly1305 only (the suite does not touch the backends); each
    scenario gets a fresh database, Redis database and queues of its own.
    """
    external = dataclasses.replace(ctx, external=True, notes=ctx.notes, _services={})
    one_plan = dataclasses.replace(plan, suites=(steps.SUITES[0],))
    ctx.log("backends: PostgreSQL + Redis + RabbitMQ")
    return {
        "one_to_one": attempt(
            "backends 1:1", lambda: scenarios.one_to_one(external, one_plan, None)
        ),
        "group": attempt("backends group", lambda: scenarios.group(external, plan)),
        "offline": attempt("backends offline", lambda: scenarios.offline(external, plan)),
    }


if __name__ == "__main__":
    sys.exit(main())
