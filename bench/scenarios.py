"""The benchmark's scenarios: each starts its own daemon, drives it, returns plain data.

Every scenario follows the same pattern: sample the daemon (and the workers) from
/proc, run one phase, sample again, and divide the daemon's CPU by the work the
workers counted. Phases are separated by a settle (the daemon idle again) so one
phase's tail is not charged to the next. Everything is bounded: counts come from the
plan and every wait has a deadline.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.daemon import BenchDaemon, DaemonSettings, sample_cores
from bench.services import ExternalServices, wait_until
from bench.steps import (
    DAEMON_CPU,
    GENERATOR_CPU,
    PASSWORD,
    SUITES,
    Log,
    _connect,
    _consistency,
    _login,
    _measure,
    _Meter,
    _names,
    _rates,
    _shares,
    _sum,
    _utilisation,
    _warm_up,
    percentiles,
)
from bench.workers import Answer, WorkerPool, cpu_between, split


@dataclass(frozen=True)
class Plan:
    """How big and how long each scenario is: ``--quick`` and ``--full``."""

    name: str
    idle_counts: tuple[int, ...]
    idle_hold: float
    heartbeat_interval: float
    router_default_logins: int
    pairs: int
    windows: tuple[int, ...]
    throughput_seconds: float
    warmup_seconds: float
    latency_rates: tuple[int, ...]
    latency_seconds: float
    churn_cycles: int
    churn_concurrency: int
    churn_messages: int
    group_rates: tuple[int, ...] = (20,)
    """Group messages per second offered (all senders together); each reaches
    ``group_members - 1`` members."""
    group_seconds: float = 4.0
    group_members: int = 500
    group_senders_per_worker: int = 1
    offline_messages: int = 10_000
    offline_senders: int = 8
    offline_window: int = 8
    catch_up_messages: int = 10_000
    catch_up_conversations: int = 50
    """One sender per conversation; each stores an equal share (``bench.catch_up``)."""
    suites: tuple[str, ...] = ("chacha20-poly1305", "rc4-hmac-sha256")
    """The 1:1 saturation runs' suites (figure 6 runs chacha20-poly1305 only)."""
    steady_rate: int = 2000
    steady_seconds: float = 15.0
    """bench.steady: one rate held this long on the shipped configuration."""
    workers: int = 2
    profile_seconds: float = 0.0
    profile_window: int = 8
    """The 1:1 window during which the daemon is profiled (chacha20-poly1305)."""


QUICK = Plan(
    name="quick",
    idle_counts=(2000,),
    idle_hold=6.0,
    heartbeat_interval=5.0,
    router_default_logins=16,
    pairs=100,
    windows=(8,),
    throughput_seconds=4.0,
    warmup_seconds=1.0,
    latency_rates=(1000, 2000, 5000),
    latency_seconds=4.0,
    churn_cycles=2000,
    churn_concurrency=16,
    churn_messages=4,
    group_rates=(20,),
    group_seconds=4.0,
)

FULL = Plan(
    name="full",
    idle_counts=(5000, 15000),
    idle_hold=11.0,
    heartbeat_interval=5.0,
    router_default_logins=48,
    pairs=100,
    windows=(1, 8, 32),
    throughput_seconds=10.0,
    warmup_seconds=2.0,
    latency_rates=(1000, 2000, 5000),
    latency_seconds=10.0,
    churn_cycles=20000,
    churn_concurrency=16,
    churn_messages=4,
    group_rates=(10, 20, 30),
    group_seconds=10.0,
    profile_seconds=10.0,
    steady_seconds=30.0,
)


@dataclass
class Context:
    """Where a run keeps its scratch files, which daemon source it runs, and on what.

    With ``external``, every daemon runs on a private share of the machine's
    PostgreSQL, Redis and RabbitMQ (``bench.services``), prepared when the daemon is
    made and removed again by ``finish``; the scenarios themselves do not change.
    """

    run_dir: str
    log: Log
    source: str | None = None
    keep: bool = False
    notes: list[str] = field(default_factory=list)
    external: bool = False
    _services: dict[str, ExternalServices] = field(default_factory=dict)

    def daemon(self, name: str, settings: DaemonSettings) -> BenchDaemon:
        if not self.external:
            return BenchDaemon(os.path.join(self.run_dir, name), settings, self.source)
        services = ExternalServices()
        services.open()
        try:
            settings = dataclasses.replace(
                settings,
                node_id=services.node_id,
                extra_config=services.config_text(),
                external=True,
            )
            daemon = BenchDaemon(
                os.path.join(self.run_dir, f"{name}-external"), settings, self.source
            )
        except BaseException:
            services.close()
            raise
        self._services[daemon.workdir] = services
        return daemon

    def finish(self, daemon: BenchDaemon) -> None:
        daemon.stop()
        services = self._services.pop(daemon.workdir, None)
        if services is not None:
            for problem in services.close():
                self.log(f"cleaning up: {problem}")
                self.notes.append(f"left behind: {problem}")
        if not self.keep:
            shutil.rmtree(os.path.join(daemon.workdir, "data"), ignore_errors=True)


# ----------------------------------------------------------------------------- idle


def idle(ctx: Context, plan: Plan, count: int) -> dict[str, Any]:
    """N authenticated, heartbeating, idle connections: memory, login rate, CPU."""
    settings = DaemonSettings(heartbeat_interval=plan.heartbeat_interval)
    daemon = ctx.daemon(f"idle-{count}", settings)
    daemon.add_users((f"i{n}" for n in range(count)), PASSWORD)
    daemon.add_users((f"w{n}" for n in range(50)), PASSWORD)
    daemon.add_users((f"r{n}" for n in range(plan.router_default_logins)), PASSWORD, True)
    daemon.start()
    workers = max(plan.workers, math.ceil(count / 4000))
    try:
        with WorkerPool(workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool:
            ctx.log(f"idle {count}: warming up")
            _warm_up(pool, "w", 50)
            empty = daemon.settle()

            ctx.log(f"idle {count}: {count} router logins")
            started = time.monotonic()
            _login(pool, "i", count)
            login_wall = time.monotonic() - started
            logged_in = daemon.settle()

            ctx.log(f"idle {count}: {count} connections with handshake")
            cores_before = sample_cores()
            before_connect = daemon.sample()
            generators_before = pool.samples()
            started = time.monotonic()
            _connect(pool, "i", count, SUITES[0])
            connect_wall = time.monotonic() - started
            connected = daemon.sample()
            generator_cpu = cpu_between(generators_before, pool.samples())
            cores_after = sample_cores()

            ctx.log(
                f"idle {count}: holding {plan.idle_hold:.0f} s (heartbeats every "
                f"{plan.heartbeat_interval:g} s)"
            )
            hold_start = daemon.sample()
            beats_before = pool.call({"cmd": "totals"}, 60)
            time.sleep(plan.idle_hold)
            hold_end = daemon.sample()
            beats_after = pool.call({"cmd": "totals"}, 60)

            pool.call({"cmd": "close"}, 120)
            resumed = _resume_cost(daemon, pool, count)
            pool.call({"cmd": "close"}, 120)
            # Last: each check at the default cost allocates 16 MiB, which the
            # allocator may keep, and must not sit in the "empty" RSS above.
            ctx.log(f"idle {count}: router check at the default KDF cost")
            router = _router_default_cost(daemon, pool, plan.router_default_logins)
    finally:
        ctx.finish(daemon)
    rss_growth = hold_end.rss_kib - empty.rss_kib
    return {
        "connections": count,
        "workers": workers,
        "rss_empty_kib": empty.rss_kib,
        "rss_logged_in_kib": logged_in.rss_kib,
        "rss_connected_kib": hold_end.rss_kib,
        "rss_per_connection_kib": rss_growth / count,
        "rss_per_connection_socket_only_kib": (hold_end.rss_kib - logged_in.rss_kib) / count,
        "router_logins_per_s": count / login_wall,
        "router_cpu_ms_per_login": logged_in.cpu_since(empty) * 1000 / count,
        "handshakes_per_s": count / connect_wall,
        "handshake_cpu_ms": connected.cpu_since(before_connect) * 1000 / count,
        "handshake_daemon_share": _utilisation(
            connected.cpu_since(before_connect), connected.wall_since(before_connect)
        ),
        "handshake_generator_share": _utilisation(generator_cpu, connect_wall),
        "handshake_daemon_core_busy": cores_after.busy_share_since(cores_before, DAEMON_CPU),
        "handshake_generator_core_busy": cores_after.busy_share_since(cores_before, GENERATOR_CPU),
        "idle_daemon_cpu_share": _utilisation(
            hold_end.cpu_since(hold_start), hold_end.wall_since(hold_start)
        ),
        "heartbeats_sent": _sum(beats_after, "totals", "heartbeats_sent")
        - _sum(beats_before, "totals", "heartbeats_sent"),
        "heartbeats_answered": _sum(beats_after, "totals", "heartbeats_received")
        - _sum(beats_before, "totals", "heartbeats_received"),
        "router_default_cost": router,
        **resumed,
    }


def _resume_cost(daemon: BenchDaemon, pool: WorkerPool, count: int) -> dict[str, float]:
    """Every connection of the figure back with its resumption ticket: no router, no
    RSA ([im] resume_window). Daemon CPU per resumed handshake, measured as the full
    handshakes are (accept, handshake, session opened)."""
    before = daemon.settle()
    started = time.monotonic()
    _connect(pool, "i", count, SUITES[0], resume=True)
    wall = time.monotonic() - started
    after = daemon.sample()
    return {
        "resumptions_per_s": count / wall,
        "resume_cpu_ms": after.cpu_since(before) * 1000 / count,
    }


def _router_default_cost(daemon: BenchDaemon, pool: WorkerPool, count: int) -> dict[str, Any]:
    """Logins/s through the router with passwords hashed at the shipped scrypt cost."""
    before = daemon.settle()
    started = time.monotonic()
    # One worker, a few concurrent requests: the KDF pool has two threads.
    pool.workers[0].send(
        {"cmd": "login", "prefix": "r", "count": count, "password": PASSWORD, "concurrency": 4}
    )
    answer = pool.workers[0].receive(600)
    wall = time.monotonic() - started
    after = daemon.sample()
    return {
        "logins": int(answer["logged_in"]),
        "failed": int(answer["failed"]),
        "logins_per_s": count / wall,
        "cpu_ms_per_login": after.cpu_since(before) * 1000 / count,
    }


# ----------------------------------------------------------------- 1:1 and latency


def one_to_one(
    ctx: Context, plan: Plan, profile: Callable[[int, float], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Saturation per suite and window, then paced latency, on one daemon."""
    settings = DaemonSettings(heartbeat_interval=plan.heartbeat_interval)
    daemon = ctx.daemon("one-to-one", settings)
    users = 2 * plan.pairs
    results: dict[str, Any] = {"pairs": plan.pairs, "throughput": [], "latency": []}
    try:
        daemon.add_users((f"p{n}" for n in range(users)), PASSWORD)
        daemon.start()
        with WorkerPool(plan.workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool:
            _login(pool, "p", users)
            for suite in plan.suites:
                _connect(pool, "p", users, suite)
                for window in plan.windows:
                    ctx.log(f"1:1 {suite}: {plan.pairs} pairs, window {window}")
                    before = pool.call({"cmd": "totals"}, 60)
                    pool.call({"cmd": "load", "window": window}, 60)
                    time.sleep(plan.warmup_seconds)
                    interval, reports = _measure(
                        daemon, pool, plan.throughput_seconds, latency=False
                    )
                    row = {"suite": suite, "window": window}
                    row.update(_rates(interval, reports))
                    profile_here = (
                        plan.profile_window
                        if plan.profile_window in plan.windows
                        else (plan.windows[-1])
                    )
                    if profile is not None and suite == SUITES[0] and window == profile_here:
                        ctx.log(f"profiling the daemon for {plan.profile_seconds:.0f} s")
                        results["profile"] = profile(daemon.pid, plan.profile_seconds)
                    drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
                    row["totals"] = _consistency(drained, before)
                    results["throughput"].append(row)
                    daemon.settle()
                pool.call({"cmd": "close"}, 120)
                daemon.settle()

            suite = SUITES[0]
            _connect(pool, "p", users, suite)
            for rate in plan.latency_rates:
                ctx.log(f"latency {suite}: {rate} msg/s offered")
                share = rate / len(pool)
                before = pool.call({"cmd": "totals"}, 60)
                pool.call({"cmd": "load", "rate": share}, 60)
                time.sleep(plan.warmup_seconds)
                interval, reports = _measure(daemon, pool, plan.latency_seconds, latency=True)
                drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
                samples = sorted(v for report in reports for v in report["latencies_us"])
                row = {"suite": suite, "offered_per_s": rate}
                row.update(_rates(interval, reports))
                row.update(percentiles(samples))
                row["totals"] = _consistency(drained, before)
                results["latency"].append(row)
                daemon.settle()
            pool.call({"cmd": "close"}, 120)
    finally:
        ctx.finish(daemon)
    return results


# ---------------------------------------------------------------------------- group


def group(ctx: Context, plan: Plan) -> dict[str, Any]:
    """One group of ``group_members`` connected members; a few of them post to it.

    The group is made over the protocol: worker 0's first connection (the owner)
    sends one GROUP_R create naming everyone else. Then, per offered rate, the
    senders (``group_senders_per_worker`` per worker, members themselves) post paced
    msg:R; every other member gets each msg:N, answers ack:R and gets ack:A. The
    daemon's CPU is divided by the msg:N its members received in the interval
    ("group deliveries"), and latency runs from the send stamp to each member's
    receipt, so it includes the fan-out's slices.
    """
    settings = DaemonSettings(heartbeat_interval=plan.heartbeat_interval)
    daemon = ctx.daemon("group", settings)
    members = plan.group_members
    results: dict[str, Any] = {"members": members, "rates": []}
    try:
        daemon.add_users((f"g{n}" for n in range(members)), PASSWORD)
        daemon.start()
        with WorkerPool(plan.workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool:
            ctx.log(f"group: {members} members log in and connect")
            _login(pool, "g", members)
            _connect(pool, "g", members, SUITES[0])
            creator = pool.workers[0]
            creator.send({"cmd": "group_create", "prefix": "g", "count": members})
            created = creator.receive(120)
            # The creator's worker accepted for its own connections; the others'
            # invited members accept from theirs (docs/privacy.md: non-contacts are
            # invited, not added).
            for worker in pool.workers[1:]:
                worker.send(
                    {"cmd": "group_join", "group": created["group"], "invited": created["invited"]}
                )
            for worker in pool.workers[1:]:
                joined = worker.receive(120)
                created["member_count"] = max(created["member_count"], joined["member_count"])
            if created["member_count"] != members:
                raise RuntimeError(
                    f"the group has {created['member_count']} members, not {members}"
                )
            group_id = str(created["group"])
            senders = plan.group_senders_per_worker * len(pool)
            results.update(group=group_id, senders=senders, receivers_per_message=members - 1)

            def post(rate: float) -> list[Answer]:
                return pool.call(
                    {
                        "cmd": "load",
                        "group": group_id,
                        "senders": plan.group_senders_per_worker,
                        "rate": rate / len(pool),
                    },
                    60,
                )

            ctx.log("group: warming up")
            before = pool.call({"cmd": "totals"}, 60)
            post(min(plan.group_rates))
            time.sleep(plan.warmup_seconds)
            drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
            results["warm_up"] = _fanout_finished(pool, before, drained, members - 1)
            daemon.settle()
            for rate in plan.group_rates:
                ctx.log(f"group: {rate} messages/s to {members} members")
                before = pool.call({"cmd": "totals"}, 60)
                post(rate)
                time.sleep(plan.warmup_seconds)
                interval, reports = _measure(daemon, pool, plan.group_seconds, latency=True)
                drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
                deliveries = _sum(reports, "counts", "received")
                row: dict[str, Any] = {"offered_per_s": rate}
                row.update(_shares(interval, deliveries))
                wall = row["seconds"]
                row.update(
                    posted=_sum(reports, "counts", "sent"),
                    deliveries=deliveries,
                    deliveries_per_s=deliveries / wall if wall else 0.0,
                    acknowledged=_sum(reports, "counts", "acks_answered"),
                    daemon_cpu_us_per_delivery=row["daemon_cpu_us_per_unit"],
                )
                row.update(
                    percentiles(sorted(v for report in reports for v in report["latencies_us"]))
                )
                row["totals"] = _fanout_finished(pool, before, drained, members - 1)
                results["rates"].append(row)
                daemon.settle()
            pool.call({"cmd": "close"}, 120)
    finally:
        ctx.finish(daemon)
    return results


def _fanout_finished(
    pool: WorkerPool,
    before: Sequence[Answer],
    drained: Sequence[Answer],
    receivers: int,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Exact counts of a group load once its fan-out is over (bounded wait).

    The senders' ack:N ACCEPTED comes before the fan-out, so a drained load may still
    have msg:N on the way: wait until members got ``accepted x receivers`` of them
    and every ack:R was answered, or nothing moved for five seconds, or ``timeout``.
    """
    totals = _consistency(drained, before)
    expected = totals["accepted"] * receivers
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        now = _consistency(pool.call({"cmd": "totals"}, 60), before)
        done = now["received"] >= expected and now["acks_answered"] >= now["received"]
        if now["received"] + now["acks_answered"] != last:
            last, last_change = now["received"] + now["acks_answered"], time.monotonic()
        if done or time.monotonic() > deadline or time.monotonic() - last_change > 5:
            break
        time.sleep(0.1)
    totals.update(
        received=now["received"],
        acks_answered=now["acks_answered"],
        expected_deliveries=expected,
        # Every accepted message reached every other member once, and each of those
        # msg:N was acknowledged (ack:R answered by ack:A).
        received_matches=now["received"] == expected,
        acknowledged_all=now["acks_answered"] == now["received"],
        # Stopped waiting while msg:N were still arriving: an overloaded daemon's
        # backlog, not a loss (the counts are then short by what was still queued).
        still_running=not done and time.monotonic() - last_change <= 5,
        errors=now["errors"],
    )
    return totals


# -------------------------------------------------------------------------- offline


OFFLINE_USER = "o0"
OFFLINE_WARM_UP_USER = "o1"


def offline(ctx: Context, plan: Plan) -> dict[str, Any]:
    """``offline_messages`` stored for one user, then pulled by one login, timed.

    The store is filled over the protocol: ``offline_senders`` connections send
    msg:R to the offline user (``offline_window`` unanswered each) until every one
    is answered ack:N STORED. Then, the daemon idle again, one worker logs the user
    in (router, handshake) and pulls and acknowledges everything as the client
    library does; the daemon's CPU from the login to the last OFFLINE_ACK_A is
    divided by the messages pulled.
    """
    settings = DaemonSettings(heartbeat_interval=plan.heartbeat_interval)
    daemon = ctx.daemon("offline", settings)
    count = plan.offline_messages
    senders = plan.offline_senders
    results: dict[str, Any] = {
        "messages": count,
        "senders": senders,
        "window": plan.offline_window,
    }
    try:
        daemon.add_users((f"f{n}" for n in range(senders)), PASSWORD)
        daemon.add_users([OFFLINE_USER, OFFLINE_WARM_UP_USER], PASSWORD)
        daemon.start()
        with WorkerPool(plan.workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool:
            _login(pool, "f", senders)
            _connect(pool, "f", senders, SUITES[0])

            ctx.log("offline: warming up (200 messages stored and pulled)")
            _fill(pool, daemon, OFFLINE_WARM_UP_USER, 200, plan.offline_window)
            _pull(pool, OFFLINE_WARM_UP_USER)

            ctx.log(f"offline: storing {count:,} messages for {OFFLINE_USER}")
            before = daemon.settle()
            meter = _Meter(daemon, pool)
            fill = _fill(pool, daemon, OFFLINE_USER, count, plan.offline_window)
            interval = meter.stop()
            stored = fill["totals"]["stored"]
            row = _shares(interval, stored)
            row.update(fill)
            row["stored_per_s"] = stored / row["seconds"] if row["seconds"] else 0.0
            results["fill"] = row
            pool.call({"cmd": "close"}, 120)

            ctx.log(f"offline: {OFFLINE_USER} logs in and pulls")
            before = daemon.settle()
            meter = _Meter(daemon, pool)
            pulled = _pull(pool, OFFLINE_USER)
            interval = meter.stop()
            row = _shares(interval, pulled["pulled"])
            row.update(pulled)
            # The wall time is the worker's, login to last OFFLINE_ACK_A; the CPU
            # interval is the same plus the command round trip (the daemon idle).
            row["wall_seconds"] = pulled["seconds"]
            row["messages_per_s"] = pulled["pulled"] / pulled["seconds"]
            row["daemon_cpu_us_per_message"] = row["daemon_cpu_us_per_unit"]
            row["stored"] = stored
            row["consistent"] = (
                pulled["pulled"] == stored
                and pulled["unique"] == pulled["pulled"]
                and pulled["acknowledged"] == len(pulled["senders"])  # a cursor each
                and pulled["left_after"] == 0
            )
            results["pull"] = row
            results["rss_before_kib"] = before.rss_kib
            pool.call({"cmd": "close"}, 120)
    finally:
        ctx.finish(daemon)
    return results


def _fill(
    pool: WorkerPool, daemon: BenchDaemon, user: str, count: int, window: int
) -> dict[str, Any]:
    """Store ``count`` messages for ``user`` over the protocol; wait until the
    daemon's database holds them all (the RabbitMQ writer is a little behind)."""
    shares = split(count, len(pool))
    started = time.monotonic()
    answers = pool.call(
        lambda i: {"cmd": "fill", "to": user, "count": shares[i][1], "window": window},
        timeout=900,
    )
    sent_for = time.monotonic() - started
    # This fill's own counts (the workers' totals run from their start).
    totals = _consistency(
        [{**answer, "totals": answer["counts"]} for answer in answers],
    )
    if totals["stored"] != count:
        raise RuntimeError(
            f"{totals['stored']} of {count} messages stored for {user}: "
            f"{totals['failure_reasons'] or totals['errors']}"
        )
    # With RabbitMQ, STORED means the offline queue has it; the writer is behind.
    if not wait_until(lambda: daemon.offline_count(user) >= count, timeout=300, interval=0.25):
        raise RuntimeError(f"the database holds {daemon.offline_count(user)} of {count} for {user}")
    return {
        "fill_seconds": sent_for,
        "in_database_seconds": time.monotonic() - started,
        "totals": totals,
    }


def _pull(pool: WorkerPool, user: str) -> dict[str, Any]:
    worker = pool.workers[0]
    worker.send({"cmd": "offline_pull", "user": user, "password": PASSWORD, "suite": SUITES[0]})
    answer = worker.receive(600)
    return {k: v for k, v in answer.items() if k not in ("cmd", "id", "pid", "ok")}


# ---------------------------------------------------------------------------- churn


def churn(ctx: Context, plan: Plan) -> dict[str, Any]:
    """K connect-login-chat-disconnect cycles in ten equal segments, sampled after each."""
    settings = DaemonSettings(heartbeat_interval=plan.heartbeat_interval)
    daemon = ctx.daemon("churn", settings)
    workers = plan.workers
    churners = plan.churn_concurrency * workers
    daemon.add_users((f"c{n}" for n in range(churners)), PASSWORD)
    daemon.add_users((f"s{n}" for n in range(workers)), PASSWORD)
    daemon.start()
    segments: list[dict[str, Any]] = []
    try:
        with WorkerPool(workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool:
            _login(pool, "s", workers)
            _connect(pool, "s", workers, SUITES[0])
            churner_slices = _names("c", churners, workers)

            def run(cycles: int) -> list[Answer]:
                per_worker = split(cycles, workers)
                return pool.call(
                    lambda i: {
                        "cmd": "churn",
                        "cycles": per_worker[i][1],
                        "messages": plan.churn_messages,
                        "password": PASSWORD,
                        "suite": SUITES[0],
                        **churner_slices[i],
                    },
                    timeout=1200,
                )

            ctx.log("churn: warming up")
            run(min(100, plan.churn_cycles // 10))
            before = daemon.settle()
            previous = before
            last: list[Answer] = []
            delivered_so_far = _sum(pool.call({"cmd": "totals"}, 60), "totals", "delivered")
            for segment in range(10):
                cycles = plan.churn_cycles // 10
                generators = pool.samples()
                started = time.monotonic()
                last = run(cycles)
                wall = time.monotonic() - started
                generator_cpu = cpu_between(generators, pool.samples())
                now = daemon.settle(0.2)
                delivered_total = _sum(last, "totals", "delivered")
                delivered = delivered_total - delivered_so_far
                delivered_so_far = delivered_total
                cpu = now.cpu_since(previous)
                done = _sum(last, "cycles")
                segments.append(
                    {
                        "segment": segment + 1,
                        "cycles": done,
                        "messages_delivered": delivered,
                        "seconds": wall,
                        "cycles_per_s": done / wall,
                        "daemon_cpu_us_per_message": cpu * 1e6 / delivered if delivered else None,
                        "daemon_cpu_ms_per_cycle": cpu * 1000 / done if done else None,
                        "rss_kib": now.rss_kib,
                        "daemon_cpu_share": _utilisation(cpu, wall),
                        "generator_cpu_share": _utilisation(generator_cpu, wall),
                    }
                )
                ctx.log(
                    f"churn: segment {segment + 1}/10: {done} cycles, RSS {now.rss_kib} KiB, "
                    f"{segments[-1]['daemon_cpu_ms_per_cycle']:.2f} ms CPU per cycle"
                )
                previous = now
            pool.call({"cmd": "close"}, 120)
            after = daemon.settle()
            totals = _consistency(last)
    finally:
        ctx.finish(daemon)
    first, final = segments[0], segments[-1]
    return {
        "cycles": sum(s["cycles"] for s in segments),
        "messages_per_cycle": plan.churn_messages,
        "concurrency": churners,
        "rss_before_kib": before.rss_kib,
        "rss_after_kib": after.rss_kib,
        "first_tenth": first,
        "last_tenth": final,
        "segments": segments,
        "totals": totals,
    }


def plan_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
