"""Issue #20: 1:1 on PostgreSQL + Redis + RabbitMQ, on one node and on two (full plan).

- One node at ``RATE`` (5,000 msg/s) offered: what the node refuses ("the node cannot
  take messages right now", counted from the senders' ERROR answers), p50/p99/p99.9
  and daemon CPU per message. Targets: no refusal, p99 < 20 ms.
- Two nodes against one at ``CROSS_RATE``: the same users log in through the router,
  whose ring spreads them over the live nodes, so a pair crosses (sender and receiver
  on different nodes, the message and its ack:N over the bus) when its two users land
  on different nodes: about half of them. CPU per message is summed over both
  daemons and divided by the one node's at the same rate. Target: <= x1.3.

Both runs use a private ZooKeeper as the registry (started as the integration tests
start theirs, tests.integration.support.zookeeper), so one node and two differ only
by the second node; each run has its own share of the services (bench.services).
Both daemons are pinned to the daemon core, the generators to theirs.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import Any

from bench.daemon import BenchDaemon, DaemonSettings
from bench.scenarios import Context, Plan
from bench.services import ExternalServices, sample_service_cpu, wait_until
from bench.steps import GENERATOR_CPU, PASSWORD, _connect, _consistency, _login, _sum, percentiles
from bench.workers import Answer, WorkerPool

RATE = 5000
"""Messages per second offered to one node (the issue's target rate)."""
CROSS_RATE = 2000
"""Messages per second offered to one node, then to two: both daemons share one core."""
REFUSAL = "ERROR: "
"""How the generator counts a msg:R the node refused (bench.loadgen)."""
MAX_P99_MS = 20.0
MAX_TWO_NODE_RATIO = 1.3
_FORWARDED = re.compile(r'^cim_messages_total\{outcome="forwarded"\} ([0-9.e+]+)$', re.M)


def distributed(ctx: Context, plan: Plan) -> dict[str, Any]:
    """One node at RATE and CROSS_RATE, then two nodes at CROSS_RATE."""
    from tests.integration.support.zookeeper import PrivateZooKeeper

    zookeeper = PrivateZooKeeper()
    zookeeper.start()
    try:
        ctx.log("distributed: one node on PostgreSQL + Redis + RabbitMQ + ZooKeeper")
        one = _run(ctx, plan, zookeeper.hosts, 1, (CROSS_RATE, RATE))
        ctx.log("distributed: two nodes, the pairs spread by the router's ring")
        two = _run(ctx, plan, zookeeper.hosts, 2, (CROSS_RATE,))
    finally:
        zookeeper.stop()
    return {"one_node": one, "two_nodes": two, "verdicts": verdicts(one, two)}


def _run(
    ctx: Context, plan: Plan, zookeeper: str, nodes: int, rates: Sequence[int]
) -> dict[str, Any]:
    services = ExternalServices(nodes=nodes)
    services.open()
    daemons: list[BenchDaemon] = []
    users = 2 * plan.pairs
    result: dict[str, Any] = {"nodes": nodes, "pairs": plan.pairs, "rows": []}
    try:
        path = f"/cim-bench-{services.run_id}/nodes"
        registry = (
            f"[registry]\nbackend = zookeeper\nzookeeper_hosts = {zookeeper}\npath = {path}\n"
        )
        for node_id in services.node_ids:
            settings = DaemonSettings(
                heartbeat_interval=plan.heartbeat_interval,
                node_id=node_id,
                extra_config=services.config_text() + registry,
                external=True,
            )
            workdir = os.path.join(ctx.run_dir, f"distributed-{nodes}-{node_id}")
            daemons.append(BenchDaemon(workdir, settings, ctx.source))
        daemons[0].add_users((f"p{n}" for n in range(users)), PASSWORD)
        for daemon in daemons:
            daemon.start()
        # The router hands out nodes from its view of the registry; wait until every
        # node is registered (and the view has had time to follow), or the second one
        # would get nobody.
        _wait_for_nodes(zookeeper, path, nodes)
        with WorkerPool(plan.workers, daemons[0].router_url, GENERATOR_CPU, ctx.run_dir) as pool:
            _login(pool, "p", users)
            _connect(pool, "p", users, "chacha20-poly1305")
            result["connections_per_node"] = [d.health().get("connections", 0) for d in daemons]
            for rate in rates:
                ctx.log(f"distributed: {nodes} node(s), {rate:,} msg/s offered")
                result["rows"].append(_paced(daemons, pool, plan, rate))
            pool.call({"cmd": "close"}, 120)
    finally:
        for daemon in daemons:
            daemon.stop()
        for problem in services.close():
            ctx.log(f"cleaning up: {problem}")
            ctx.notes.append(f"left behind: {problem}")
    return result


def _wait_for_nodes(hosts: str, path: str, nodes: int) -> None:
    from kazoo.client import KazooClient

    client = KazooClient(hosts=hosts, timeout=5.0)
    client.start(timeout=10.0)
    try:

        def registered() -> bool:
            return len(client.get_children(path)) >= nodes if client.exists(path) else False

        if not wait_until(registered, 30.0, 0.2):
            raise RuntimeError(f"{nodes} nodes did not register within 30 s")
    finally:
        client.stop()
        client.close()
    time.sleep(1.0)


def _forwarded(daemons: Sequence[BenchDaemon]) -> int:
    total = 0
    for daemon in daemons:
        found = _FORWARDED.search(daemon.metrics_text())
        total += int(float(found.group(1))) if found else 0
    return total


def _paced(
    daemons: Sequence[BenchDaemon], pool: WorkerPool, plan: Plan, rate: int
) -> dict[str, Any]:
    """One paced load: CPU of every daemon summed, latencies, refusals, crossings."""
    # The metrics are read while the daemons are idle: a saturated one answers late.
    forwarded = _forwarded(daemons)
    before = pool.call({"cmd": "totals"}, 60)
    pool.call({"cmd": "load", "rate": rate / len(pool)}, 60)
    time.sleep(plan.warmup_seconds)
    pool.call({"cmd": "mark", "latency": True}, 60)
    services = sample_service_cpu()
    starts = [daemon.sample() for daemon in daemons]
    time.sleep(plan.latency_seconds)
    reports = pool.call({"cmd": "report"}, 120)
    ends = [daemon.sample() for daemon in daemons]
    services = sample_service_cpu() - services
    drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
    for daemon in daemons:
        daemon.settle()
    forwarded = _forwarded(daemons) - forwarded
    samples = sorted(v for report in reports for v in report["latencies_us"])
    return {
        "offered_per_s": rate,
        **counts(reports, before, drained, starts, ends, services, forwarded),
        **percentiles(samples),
    }


def counts(
    reports: Sequence[Answer],
    before: Sequence[Answer],
    drained: Sequence[Answer],
    starts: Sequence[Any],
    ends: Sequence[Any],
    services_cpu: float,
    forwarded: int,
) -> dict[str, Any]:
    """The figures of one load from the workers' answers and the daemons' samples:
    refusals are the drained load's ERROR answers (not those of earlier loads), the
    crossing share is the whole load's messages forwarded to the other node per
    message sent."""
    delivered = _sum(reports, "counts", "delivered")
    wall = ends[0].wall_since(starts[0])
    cpu = [end.cpu_since(start) for start, end in zip(starts, ends, strict=True)]
    totals = _consistency(drained, before)
    earlier = _refusals(before)
    refusals = {
        reason: count - earlier.get(reason, 0)
        for reason, count in _refusals(drained).items()
        if count > earlier.get(reason, 0)
    }
    return {
        "seconds": wall,
        "delivered": delivered,
        "delivered_per_s": delivered / wall if wall else 0.0,
        "failed_in_window": _sum(reports, "counts", "failed"),
        "refused": sum(refusals.values()),
        "refusals": refusals,
        "daemon_cpu_share_per_node": [c / wall if wall else 0.0 for c in cpu],
        "daemon_cpu_us_per_message": sum(cpu) * 1e6 / delivered if delivered else None,
        "services_cpu_us_per_message": services_cpu * 1e6 / delivered if delivered else None,
        "crossing_share": forwarded / totals["sent"] if totals["sent"] else None,
        "totals": totals,
    }


def _refusals(answers: Sequence[Answer]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for answer in answers:
        for reason, count in answer.get("failure_reasons", {}).items():
            if reason.startswith(REFUSAL):
                merged[reason] = merged.get(reason, 0) + int(count)
    return merged


def _row(result: dict[str, Any], rate: int) -> dict[str, Any] | None:
    return next((r for r in result.get("rows", []) if r["offered_per_s"] == rate), None)


def verdicts(one: dict[str, Any], two: dict[str, Any]) -> dict[str, Any]:
    """The issue's two targets measured here, and the two-node cost ratio."""
    fast = _row(one, RATE)
    base, pair = _row(one, CROSS_RATE), _row(two, CROSS_RATE)
    ratio = None
    if base and pair and base["daemon_cpu_us_per_message"] and pair["daemon_cpu_us_per_message"]:
        ratio = pair["daemon_cpu_us_per_message"] / base["daemon_cpu_us_per_message"]
    return {
        "one_node_rate_met": bool(
            fast and fast["refused"] == 0 and (fast["p99_ms"] or 1e9) < MAX_P99_MS
        ),
        "two_node_ratio": ratio,
        "two_node_ratio_met": ratio is not None and ratio <= MAX_TWO_NODE_RATIO,
    }


def figures(result: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """The report's rows (figure, measured, target, verdict)."""
    if result is None:
        return [("11. distributed backends", "not run (--only distributed, or --full)", "", "")]
    if "error" in result:
        return [("11. distributed backends", "FAILED", "", str(result["error"]))]
    out = []
    fast = _row(result["one_node"], RATE)
    marks = result["verdicts"]
    if fast is not None:
        out.append(
            (
                f"11. one node, {RATE:,} msg/s offered",
                f"{fast['delivered_per_s']:,.0f} msg/s, {fast['refused']:,} refused, p50 "
                f"{fast['p50_ms']} / p99 {fast['p99_ms']} / p99.9 {fast['p999_ms']} ms, "
                f"{fast['daemon_cpu_us_per_message'] or 0:.1f} us/msg",
                f"0 refused, p99 < {MAX_P99_MS:g} ms",
                "meets" if marks["one_node_rate_met"] else "misses",
            )
        )
    base = _row(result["one_node"], CROSS_RATE)
    pair = _row(result["two_nodes"], CROSS_RATE)
    if base is not None and pair is not None:
        ratio = marks["two_node_ratio"]
        out.append(
            (
                f"11. two nodes vs one, {CROSS_RATE:,} msg/s",
                f"{pair['daemon_cpu_us_per_message'] or 0:.1f} vs "
                f"{base['daemon_cpu_us_per_message'] or 0:.1f} us/msg (x{ratio or 0:.2f}), "
                f"{(pair['crossing_share'] or 0) * 100:.0f} % crossing, "
                f"{pair['refused']:,} refused, p99 {pair['p99_ms']} ms",
                f"<= x{MAX_TWO_NODE_RATIO}",
                "meets" if marks["two_node_ratio_met"] else "misses",
            )
        )
    return out
