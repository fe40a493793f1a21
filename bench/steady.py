"""Steady 2,000 msg/s 1:1 on the shipped configuration: latency, stalls, CPU (issue #20).

The 1:1 latency rows of ``bench.scenarios.one_to_one`` run a few seconds at each rate
with the benchmark's short heartbeat; a periodic stall (a group commit, a full garbage
collection, a purge) that comes every few seconds then falls between them or into the
warm-up. This scenario holds one rate for ``steady_seconds`` with the configuration
as shipped (timelines on, heartbeat 30 s, embedded backends, both suites offered; only
the KDF cost is the lowest, as everywhere in the bench) and asks the daemon itself how
long its reactor was held: the lag probe (``[node] lag_probe_interval``,
``cim.metrics.ReactorLag``) is read from /metrics before and after the window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.daemon import BenchDaemon, DaemonSettings
from bench.scenarios import Context, Plan
from bench.steps import (
    GENERATOR_CPU,
    PASSWORD,
    SUITES,
    _connect,
    _consistency,
    _login,
    _measure,
    _rates,
    percentiles,
)
from bench.workers import WorkerPool

SHIPPED_HEARTBEAT = 30.0
LAG_PROBE_INTERVAL = 0.005
"""Every stall longer than this shows as one gap of about its length."""
STALL_MS = 10.0
"""A gap longer than this is a stall (the issue's target: none)."""


def parse_reactor_gaps(text: str, name: str = "cim_reactor_gap") -> dict[str, Any]:
    """The lag probe's figures in a /metrics text: cumulative buckets and the maximum.

    ``name`` cim_reactor_gap: wall time between the probe's runs; cim_reactor_gap_cpu:
    the process's CPU time within each.
    """
    buckets: dict[float, float] = {}
    longest = None
    count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_seconds_bucket{{"):
            label, value = line.rsplit(" ", 1)
            bound = label.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(value)
        elif line.startswith(f"{name}_seconds_count "):
            count = float(line.split()[1])
        elif line.startswith(f"{name}_max_seconds "):
            longest = float(line.split()[1])
    if longest is None:
        raise ValueError(f"no {name}_max_seconds: is [node] lag_probe_interval set?")
    return {"buckets": buckets, "count": count, "max_s": longest}


def parse_collector(text: str) -> dict[str, list[float]]:
    """The garbage collector's figures in a /metrics text, by generation (0, 1, 2):
    collections, seconds spent, and the longest pause since start
    (``cim.metrics.CollectorPauses``, on with the lag probe)."""
    found: dict[str, list[float]] = {
        "collections": [0.0] * 3,
        "seconds": [0.0] * 3,
        "longest": [0.0] * 3,
    }
    names = {
        "cim_gc_collections_total": "collections",
        "cim_gc_pause_seconds_total": "seconds",
        "cim_gc_pause_max_seconds": "longest",
    }
    for line in text.splitlines():
        name, _, rest = line.partition('{generation="')
        key = names.get(name)
        if key is None or not rest:
            continue
        generation, _, value = rest.partition('"} ')
        found[key][int(generation)] = float(value)
    return found


def collections_between(
    before: dict[str, list[float]], after: dict[str, list[float]]
) -> dict[str, Any]:
    """What the collector did in a window: full collections, all its pauses together,
    and the longest full one (since start: the window's when it grew in the window)."""
    return {
        "gc_full_collections": int(after["collections"][2] - before["collections"][2]),
        "gc_ms": 1000 * sum(after["seconds"][g] - before["seconds"][g] for g in range(3)),
        "gc_longest_full_ms": 1000 * after["longest"][2],
    }


def stalls_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Gaps past STALL_MS in the window, and the longest gap of the window.

    The daemon keeps its longest gap since start: when it grew during the window it is
    the window's own, exactly; otherwise the window's longest lies in the highest
    bucket that gained a gap, and its bound is reported (``longest_exact`` False).
    """
    bounds = sorted(after["buckets"])
    gained = {b: after["buckets"][b] - before["buckets"].get(b, 0.0) for b in bounds}
    below_stall = max((gained[b] for b in bounds if b <= STALL_MS / 1000), default=0.0)
    total = after["count"] - before["count"]
    over = round(total - below_stall)
    if after["max_s"] > before["max_s"]:
        longest_ms, exact = after["max_s"] * 1000, True
    else:
        # Cumulative buckets: the first bound that holds every gap of the window.
        total_gained = gained[bounds[-1]] if bounds else 0.0
        top = next((b for b in bounds if gained[b] >= total_gained), 0.0)
        longest_ms, exact = min(top, before["max_s"]) * 1000, False
    return {
        "probe_runs": round(total),
        "stalls_over_10ms": over,
        "longest_stall_ms": longest_ms,
        "longest_exact": exact,
    }


def holds_between(text_before: str, text_after: str) -> dict[str, Any]:
    """The reactor's holds between polls in the window (``cim_reactor_hold``): how many
    over STALL_MS and the longest, as ``stalls_between`` counts the probe's gaps. Empty
    for a daemon that does not time them (a ``--source`` from before, another reactor)."""
    name = "cim_reactor_hold"
    try:
        before, after = parse_reactor_gaps(text_before, name), parse_reactor_gaps(text_after, name)
    except ValueError:
        return {}
    window = stalls_between(before, after)
    return {
        "holds_over_10ms": window["stalls_over_10ms"],
        "longest_hold_ms": window["longest_stall_ms"],
        "longest_hold_exact": window["longest_exact"],
    }


def steady(ctx: Context, plan: Plan) -> dict[str, Any]:
    """``plan.pairs`` pairs at ``plan.steady_rate`` msg/s for ``plan.steady_seconds``."""
    settings = DaemonSettings(
        heartbeat_interval=SHIPPED_HEARTBEAT, lag_probe_interval=LAG_PROBE_INTERVAL
    )
    daemon: BenchDaemon = ctx.daemon("steady", settings)
    users = 2 * plan.pairs
    suite = SUITES[0]
    result: dict[str, Any] = {
        "pairs": plan.pairs,
        "suite": suite,
        "offered_per_s": plan.steady_rate,
        "heartbeat_s": SHIPPED_HEARTBEAT,
    }
    try:
        daemon.add_users((f"s{n}" for n in range(users)), PASSWORD)
        daemon.start()
        with WorkerPool(plan.workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool:
            _login(pool, "s", users)
            _connect(pool, "s", users, suite)
            ctx.log(
                f"steady: {plan.steady_rate} msg/s for {plan.steady_seconds:.0f} s, "
                f"{plan.pairs} pairs, shipped configuration"
            )
            before = pool.call({"cmd": "totals"}, 60)
            pool.call({"cmd": "load", "rate": plan.steady_rate / len(pool)}, 60)
            time.sleep(plan.warmup_seconds)
            text_before = daemon.metrics_text()
            interval, reports = _measure(daemon, pool, plan.steady_seconds, latency=True)
            text_after = daemon.metrics_text()
            drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
            samples = sorted(v for report in reports for v in report["latencies_us"])
            result.update(_rates(interval, reports))
            result.update(percentiles(samples))
            result.update(
                stalls_between(parse_reactor_gaps(text_before), parse_reactor_gaps(text_after))
            )
            # The same gaps by the CPU the process used within them: what was its own work.
            cpu = "cim_reactor_gap_cpu"
            own = stalls_between(
                parse_reactor_gaps(text_before, cpu), parse_reactor_gaps(text_after, cpu)
            )
            result["cpu_stalls_over_10ms"] = own["stalls_over_10ms"]
            result.update(
                collections_between(parse_collector(text_before), parse_collector(text_after))
            )
            result["longest_cpu_stall_ms"] = own["longest_stall_ms"]
            result.update(holds_between(text_before, text_after))
            result["totals"] = _consistency(drained, before)
            pool.call({"cmd": "close"}, 120)
    finally:
        ctx.finish(daemon)
    return result


TARGETS = {"p99_ms": 2.0, "p999_ms": 5.0, "longest_stall_ms": STALL_MS, "cpu_us": 100.0}


def figures(result: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) rows for the report's table (issue #20)."""
    name = "3b. steady 1:1, shipped configuration"
    if result is None:
        return [(name, "not run (--only steady)", "", "")]
    if "error" in result:
        return [(name, "FAILED", "", str(result["error"]))]

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    p99, p999 = result["p99_ms"], result["p999_ms"]
    cpu = result["daemon_cpu_us_per_message"]
    stall = result["longest_stall_ms"]
    rate = f"{result['offered_per_s']:,} msg/s for {result['seconds']:.0f} s"
    totals = result["totals"]
    exact = totals["consistent"] and totals["received_matches"]
    bound = "" if result["longest_exact"] else " (bound: bucket)"
    return [
        (
            f"{name}: latency at {rate}",
            f"p50 {result['p50_ms']:.2f} / p99 {p99:.2f} / p99.9 {p999:.2f} / "
            f"max {result['max_ms']:.1f} ms",
            "p99 < 2 ms, p99.9 < 5 ms",
            verdict(p99 is not None and p999 is not None and p99 < 2.0 and p999 < 5.0),
        ),
        _stall_row(name, result, stall, bound, verdict),
        (
            f"{name}: daemon CPU per message",
            f"{cpu:.1f} us ({result['delivered_per_s']:,.0f} msg/s delivered; "
            f"counts {'exact' if exact else 'WRONG'})",
            "<= 100 us",
            verdict(cpu is not None and cpu <= 100.0 and exact),
        ),
    ]


def _stall_row(
    name: str, result: dict[str, Any], stall: float, bound: str, verdict: Callable[[bool], str]
) -> tuple[str, str, str, str]:
    """The stall row: judged on the reactor's holds between polls where the daemon
    times them (exact), else on the lag probe's gaps (each up to one probe interval
    longer than the hold behind it); the probe's figures are shown either way."""
    probe = (
        f"lag probe: {stall:.1f} ms{bound}, {result['stalls_over_10ms']} gaps over 10 ms "
        f"(CPU within a gap: at most {result.get('longest_cpu_stall_ms', 0):.1f} ms, "
        f"{result.get('cpu_stalls_over_10ms', 0)} over 10 ms)" + _collector_text(result)
    )
    if "longest_hold_ms" not in result:
        return (
            f"{name}: longest reactor stall (lag probe)",
            probe,
            "no stall over 10 ms",
            verdict(result["stalls_over_10ms"] == 0),
        )
    exact = "" if result["longest_hold_exact"] else " (bound: bucket)"
    return (
        f"{name}: longest reactor stall (between two polls)",
        f"{result['longest_hold_ms']:.1f} ms{exact}, {result['holds_over_10ms']} over 10 ms; "
        + probe,
        "no stall over 10 ms",
        verdict(result["holds_over_10ms"] == 0),
    )


def _collector_text(result: dict[str, Any]) -> str:
    """The collector's part of the stalls, when the run measured it."""
    if "gc_full_collections" not in result:
        return ""
    return (
        f"; garbage collection {result['gc_ms']:.0f} ms in the window, "
        f"{result['gc_full_collections']} full (the longest full one since start "
        f"{result['gc_longest_full_ms']:.1f} ms)"
    )
