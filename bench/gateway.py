"""Figure 9 (issue 18, acceptance 5): the WebSocket gateway beside the TCP connector.

The same clients (``bench.loadgen``: the real handshake and sealed frames) reach the
same daemon's node through its TCP port and through its gateway (``[ws]``), one
transport after the other:

- **idle memory per connection**: RSS growth of a fresh daemon per transport (both
  with the gateway listening, so both carry autobahn) from empty to ``count``
  authenticated, heartbeating, idle connections, divided by ``count``, as figure 1;
- **CPU per 1:1 message**: the daemon's CPU over ``plan.throughput_seconds`` of
  ``plan.pairs`` pairs at window 8, divided by the messages delivered, as figure 2.

``python -m bench.run --only gateway`` runs it; ``--full`` includes it.
"""

from __future__ import annotations

import time
from typing import Any

from bench.daemon import DaemonSettings
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
    _warm_up,
)
from bench.workers import WorkerPool

__all__ = ["TRANSPORTS", "figures", "gateway"]

TRANSPORTS = ("tcp", "websocket")
WINDOW = 8


def gateway(ctx: Context, plan: Plan) -> dict[str, Any]:
    count = plan.idle_counts[0]
    results: dict[str, Any] = {"connections": count, "pairs": plan.pairs, "window": WINDOW}
    for transport in TRANSPORTS:
        results[transport] = _one_transport(ctx, plan, transport, count)
    return results


def _one_transport(ctx: Context, plan: Plan, transport: str, count: int) -> dict[str, Any]:
    settings = DaemonSettings(heartbeat_interval=plan.heartbeat_interval, websocket=True)
    daemon = ctx.daemon(f"gateway-{transport}", settings)
    users = 2 * plan.pairs
    daemon.add_users((f"i{n}" for n in range(count)), PASSWORD)
    daemon.add_users((f"p{n}" for n in range(users)), PASSWORD)
    daemon.add_users((f"w{n}" for n in range(50)), PASSWORD)
    daemon.start()
    row: dict[str, Any] = {}
    try:
        with WorkerPool(plan.workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool:
            ctx.log(f"gateway {transport}: warming up")
            _warm_up(pool, "w", 50)
            _login(pool, "i", count)
            _login(pool, "p", users)
            empty = daemon.settle()
            ctx.log(f"gateway {transport}: {count} idle connections")
            _connect(pool, "i", count, SUITES[0], transport)
            time.sleep(plan.idle_hold)
            held = daemon.settle()
            row["rss_per_connection_kib"] = (held.rss_kib - empty.rss_kib) / count
            pool.call({"cmd": "close"}, 120)
            daemon.settle()

            ctx.log(f"gateway {transport}: 1:1, {plan.pairs} pairs, window {WINDOW}")
            _connect(pool, "p", users, SUITES[0], transport)
            before = pool.call({"cmd": "totals"}, 60)
            pool.call({"cmd": "load", "window": WINDOW}, 60)
            time.sleep(plan.warmup_seconds)
            interval, reports = _measure(daemon, pool, plan.throughput_seconds, latency=False)
            row.update(_rates(interval, reports))
            drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
            row["totals"] = _consistency(drained, before)
            pool.call({"cmd": "close"}, 120)
    finally:
        ctx.finish(daemon)
    return row


def figures(results: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) rows for the report's table."""
    name = "9. WebSocket gateway"
    if results is None:
        return [(name, "not run (--only gateway, or --full)", "", "")]
    if "error" in results:
        return [(name, "FAILED", "", str(results["error"]))]
    tcp, ws = results["tcp"], results["websocket"]
    count = results["connections"]
    exact = all(
        row["totals"]["consistent"] and row["totals"]["received_matches"] for row in (tcp, ws)
    )
    return [
        (
            f"{name}: idle RSS per connection ({count:,} conns), WebSocket / TCP",
            f"{ws['rss_per_connection_kib']:.2f} / {tcp['rss_per_connection_kib']:.2f} KiB",
            "(side by side)",
            "",
        ),
        (
            f"{name}: 1:1 chacha20-poly1305, {results['pairs']} pairs, window "
            f"{results['window']}, WebSocket / TCP",
            f"{_us(ws)} / {_us(tcp)} us CPU per message; "
            f"{ws['delivered_per_s']:,.0f} / {tcp['delivered_per_s']:,.0f} msg/s "
            f"(saturated: {ws['saturated']} / {tcp['saturated']})",
            "(side by side)",
            "",
        ),
        (
            f"{name}: counts, sent = delivered + failed, delivered = received",
            "exact on both" if exact else "NOT EXACT",
            "exact",
            "meets" if exact else "MISSES",
        ),
    ]


def _us(row: dict[str, Any]) -> str:
    value = row.get("daemon_cpu_us_per_message")
    return "n/a" if value is None else f"{value:.1f}"
