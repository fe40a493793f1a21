"""Figure 10 (issue 19, acceptance 3): the 1:1 and group figures while APNs is down.

The same loads run on two daemons (embedded default), one after the other:

- **no push**: ``[push]`` left at its default (off);
- **APNs down**: ``[push] enabled = true`` with an APNs key and ``apns_endpoint`` on a
  loopback port nobody listens on (every request is refused at once: the provider is
  down, not slow), ``queue_size`` lowered to ``QUEUE_SIZE`` so the queue's overflow
  (non-urgent pushes dropped and counted) is reached within the quick plan.

``OFFLINE_USERS`` users are never connected; on the APNs daemon each has one APNs
registration, written into the database before the start (as the benchmark writes its
users). Throughout, a side load (a worker pool of its own, ``SIDE_SENDERS``
connections) stores one msg:R from each sender for one offline user after another,
pausing ``SIDE_PAUSE`` between users, so every message opens a push window and the
pushes pile up against the dead provider. After ``PILE_UP`` seconds of that, with the
side load still running (the provider is down for about 60 s in all):

- **1:1**: ``plan.pairs`` pairs at window 8 for ``plan.throughput_seconds`` (figure 2);
- **group**: ``GROUP_MEMBERS`` connected members, ``GROUP_RATE`` msg/s (figure 4,
  smaller).

The daemon's CPU per 1:1 message and per group delivery includes the side load's
share in both daemons, so the ratio is what the push path costs on top. The push
figures (queue depth, pushes by outcome) are read from the daemon's /metrics.

``python -m bench.run --only push_outage`` runs it; ``--full`` includes it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import insert

from bench.daemon import BenchDaemon, DaemonSettings, free_port
from bench.scenarios import Context, Plan, _fanout_finished
from bench.steps import (
    GENERATOR_CPU,
    PASSWORD,
    SUITES,
    _connect,
    _consistency,
    _login,
    _measure,
    _rates,
    _shares,
    _sum,
)
from bench.workers import WorkerPool
from cim.storage.database import open_engine
from cim.storage.schema import push_registrations

__all__ = ["MODES", "figures", "parse_push_metrics", "push_outage"]

MODES = ("no_push", "apns_down")
WINDOW = 8
OFFLINE_USERS = 200
DEVICE = "phone"
SIDE_SENDERS = 8
SIDE_PAUSE = 0.1
PILE_UP = 45.0
GROUP_MEMBERS = 100
GROUP_RATE = 20
QUEUE_SIZE = 1000


def push_outage(ctx: Context, plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {
        "pairs": plan.pairs,
        "window": WINDOW,
        "group_members": GROUP_MEMBERS,
        "group_rate": GROUP_RATE,
        "offline_users": OFFLINE_USERS,
        "queue_size": QUEUE_SIZE,
    }
    for mode in MODES:
        results[mode] = _one_mode(ctx, plan, mode)
    return results


def _push_config(workdir: str) -> str:
    """``[push]`` on APNs at a port nobody listens on (probed free, then let go)."""
    key_path = os.path.join(workdir, "AuthKey_BENCH.p8")
    key = ec.generate_private_key(ec.SECP256R1())
    with open(key_path, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return (
        "[push]\nenabled = true\n"
        f"apns_key_file = {key_path}\napns_key_id = BENCHKEY01\napns_team_id = BENCHTEAM1\n"
        "apns_topic = com.example.bench\n"
        f"apns_endpoint = http://127.0.0.1:{free_port()}\n"
        f"queue_size = {QUEUE_SIZE}\n"
    )


def _register_devices(daemon: BenchDaemon, names: list[str]) -> None:
    now = time.time()
    rows = [
        {
            "user_name": name,
            "device": DEVICE,
            "provider": "apns",
            "token": f"{n:064x}",
            "app": None,
            "locale": None,
            "created_at": now,
            "updated_at": now,
        }
        for n, name in enumerate(names)
    ]
    engine = open_engine(daemon.config.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(insert(push_registrations), rows)
    finally:
        engine.dispose()


class _SideLoad:
    """One msg:R per side sender to each offline user in turn, until stopped."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.stopping = threading.Event()
        self.answers: list[Any] = []
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.thread = threading.Thread(target=self._run, name="push-side-load", daemon=True)

    def _run(self) -> None:
        target = 0
        try:
            while not self.stopping.is_set():
                user = f"o{target % OFFLINE_USERS}"
                target += 1
                self.answers += self.pool.call(
                    {"cmd": "fill", "to": user, "count": SIDE_SENDERS, "window": 1}, 120
                )
                self.stopping.wait(SIDE_PAUSE)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.thread.start()

    def stop(self) -> dict[str, Any]:
        self.stopping.set()
        self.thread.join(180)
        if self.error is not None:
            raise RuntimeError(f"the side load failed: {self.error}") from self.error
        if self.thread.is_alive():
            raise RuntimeError("the side load did not stop within 180 s")
        totals = _consistency([{**answer, "totals": answer["counts"]} for answer in self.answers])
        totals["fills"] = len(self.answers)
        return totals


def _one_mode(ctx: Context, plan: Plan, mode: str) -> dict[str, Any]:
    # Embedded only (the figure compares push on and off, not the backends).
    workdir = os.path.join(ctx.run_dir, f"push-{mode}")
    os.makedirs(workdir, exist_ok=True)
    extra = _push_config(workdir) if mode == "apns_down" else ""
    settings = DaemonSettings(heartbeat_interval=plan.heartbeat_interval, extra_config=extra)
    daemon = BenchDaemon(workdir, settings, ctx.source)
    users = 2 * plan.pairs
    offline_names = [f"o{n}" for n in range(OFFLINE_USERS)]
    daemon.add_users((f"p{n}" for n in range(users)), PASSWORD)
    daemon.add_users((f"g{n}" for n in range(GROUP_MEMBERS)), PASSWORD)
    daemon.add_users((f"s{n}" for n in range(SIDE_SENDERS)), PASSWORD)
    daemon.add_users(offline_names, PASSWORD)
    if mode == "apns_down":
        _register_devices(daemon, offline_names)
    side_dir = os.path.join(daemon.workdir, "side")
    os.makedirs(side_dir, exist_ok=True)
    row: dict[str, Any] = {}
    daemon.start()
    try:
        with (
            WorkerPool(plan.workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool,
            WorkerPool(1, daemon.router_url, GENERATOR_CPU, side_dir) as side_pool,
        ):
            _login(side_pool, "s", SIDE_SENDERS)
            _connect(side_pool, "s", SIDE_SENDERS, SUITES[0])
            _login(pool, "p", users)
            side = _SideLoad(side_pool)
            ctx.log(f"push {mode}: side load to {OFFLINE_USERS} offline users, {PILE_UP:g} s")
            side.start()
            try:
                time.sleep(PILE_UP)
                row["metrics_before"] = parse_push_metrics(daemon.metrics_text())

                ctx.log(f"push {mode}: 1:1, {plan.pairs} pairs, window {WINDOW}")
                _connect(pool, "p", users, SUITES[0])
                before = pool.call({"cmd": "totals"}, 60)
                pool.call({"cmd": "load", "window": WINDOW}, 60)
                time.sleep(plan.warmup_seconds)
                interval, reports = _measure(daemon, pool, plan.throughput_seconds, latency=False)
                one = _rates(interval, reports)
                drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
                one["totals"] = _consistency(drained, before)
                row["one_to_one"] = one
                pool.call({"cmd": "close"}, 120)

                ctx.log(f"push {mode}: group, {GROUP_MEMBERS} members, {GROUP_RATE} msg/s")
                row["group"] = _group(daemon, plan)
                row["metrics_after"] = parse_push_metrics(daemon.metrics_text())
            finally:
                row["side"] = side.stop()
            row["side_seconds"] = time.monotonic() - side.started_at
            side_pool.call({"cmd": "close"}, 120)
    finally:
        ctx.finish(daemon)
    return row


def _group(daemon: BenchDaemon, plan: Plan) -> dict[str, Any]:
    """Figure 4's load, smaller, from one worker of its own: a group made over the
    protocol invites the creator's non-contacts, and only the creator's worker
    accepts for its connections, so every member is connected there."""
    group_dir = os.path.join(daemon.workdir, "group")
    os.makedirs(group_dir, exist_ok=True)
    with WorkerPool(1, daemon.router_url, GENERATOR_CPU, group_dir) as pool:
        _login(pool, "g", GROUP_MEMBERS)
        _connect(pool, "g", GROUP_MEMBERS, SUITES[0])
        creator = pool.workers[0]
        creator.send({"cmd": "group_create", "prefix": "g", "count": GROUP_MEMBERS})
        created = creator.receive(120)
        if created["member_count"] != GROUP_MEMBERS:
            raise RuntimeError(f"the group has {created['member_count']} members")
        row = _group_load(pool, daemon, plan, str(created["group"]))
        pool.call({"cmd": "close"}, 120)
    return row


def _group_load(pool: WorkerPool, daemon: BenchDaemon, plan: Plan, group_id: str) -> dict[str, Any]:
    receivers = GROUP_MEMBERS - 1
    before = pool.call({"cmd": "totals"}, 60)
    pool.call({"cmd": "load", "group": group_id, "senders": 2, "rate": GROUP_RATE}, 60)
    time.sleep(plan.warmup_seconds)
    interval, reports = _measure(daemon, pool, plan.group_seconds, latency=False)
    drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
    deliveries = _sum(reports, "counts", "received")
    row = _shares(interval, deliveries)
    wall = row["seconds"]
    row.update(
        deliveries=deliveries,
        deliveries_per_s=deliveries / wall if wall else 0.0,
        daemon_cpu_us_per_delivery=row["daemon_cpu_us_per_unit"],
    )
    row["totals"] = _fanout_finished(pool, before, drained, receivers)
    return row


_SAMPLE = re.compile(r"^(cim_push\w*?)(?:_total)?(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$")


def parse_push_metrics(text: str) -> dict[str, float]:
    """``cim_push_queue_depth`` and ``cim_pushes`` by outcome (``pushes_<outcome>``)
    from a /metrics page; nothing when push is off (the families are not there)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None:
            continue
        name, labels, value = match.groups()
        if name == "cim_push_queue_depth":
            found["queue_depth"] = float(value)
        elif name == "cim_pushes" and labels:
            outcome = dict(part.split("=", 1) for part in labels.split(",") if "=" in part).get(
                "outcome", '"?"'
            )
            key = f"pushes_{outcome.strip(chr(34))}"
            found[key] = found.get(key, 0.0) + float(value)
    return found


def figures(results: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) rows for the report's table."""
    name = "10. APNs down"
    if results is None:
        return [(name, "not run (--only push_outage, or --full)", "", "")]
    if "error" in results:
        return [(name, "FAILED", "", str(results["error"]))]
    off, down = results["no_push"], results["apns_down"]
    exact = all(
        row["one_to_one"]["totals"]["consistent"]
        and row["one_to_one"]["totals"]["received_matches"]
        and row["group"]["totals"]["consistent"]
        and row["group"]["totals"]["received_matches"]
        and row["side"]["consistent"]
        for row in (off, down)
    )
    after = down.get("metrics_after", {})
    return [
        (
            f"{name}: 1:1 chacha20-poly1305, {results['pairs']} pairs, window "
            f"{results['window']}, APNs down / no push",
            f"{_us(down['one_to_one'], 'daemon_cpu_us_per_message')} / "
            f"{_us(off['one_to_one'], 'daemon_cpu_us_per_message')} us CPU per message; "
            f"{down['one_to_one']['delivered_per_s']:,.0f} / "
            f"{off['one_to_one']['delivered_per_s']:,.0f} msg/s",
            "unchanged",
            "",
        ),
        (
            f"{name}: group, {results['group_members']} members, {results['group_rate']} "
            "msg/s, APNs down / no push",
            f"{_us(down['group'], 'daemon_cpu_us_per_delivery')} / "
            f"{_us(off['group'], 'daemon_cpu_us_per_delivery')} us CPU per delivery",
            "unchanged",
            "",
        ),
        (
            f"{name}: pushes (queue {results['queue_size']:,})",
            f"queue depth {after.get('queue_depth', 0):,.0f}, retried "
            f"{after.get('pushes_retried', 0):,.0f}, gave up "
            f"{after.get('pushes_gave_up', 0) + after.get('pushes_failed', 0):,.0f}, dropped "
            f"{after.get('pushes_dropped', 0):,.0f}, accepted "
            f"{after.get('pushes_accepted', 0):,.0f}",
            "(reported)",
            "",
        ),
        (
            f"{name}: counts, sent = delivered + failed (1:1, group, side load)",
            "exact on both" if exact else "NOT EXACT",
            "exact",
            "meets" if exact else "MISSES",
        ),
    ]


def _us(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "n/a" if value is None else f"{value:.1f}"
