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
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.daemon import BenchDaemon, CoreSample, DaemonSettings, ProcSample, sample_cores
from bench.services import ExternalServices, sample_service_cpu, wait_until
from bench.workers import Answer, WorkerPool, cpu_between, split

PASSWORD = "bench-password"
SUITES = ("chacha20-poly1305", "rc4-hmac-sha256")
DAEMON_CPU = 0
GENERATOR_CPU = 1
SATURATED = 0.85
"""A side using at least this share of its core is the one that limits the rate.

Not 100 %: a saturated side still waits a little for the other between bursts, and
/proc counts CPU in 10 ms ticks."""

Log = Callable[[str], None]


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


def _utilisation(cpu: float, wall: float) -> float:
    return cpu / wall if wall > 0 else 0.0


def saturated_side(daemon_core_busy: float, generator_core_busy: float) -> str:
    """Which side ran out of CPU: the one whose core was (nearly) always busy.

    The cores' busy shares come from /proc/stat, so a core full because some other
    process ran on it too still counts as full: that side could go no faster. The
    daemon's and the generator's own shares say how much of it they had.
    """
    if daemon_core_busy >= SATURATED:
        return "daemon"
    if generator_core_busy >= SATURATED:
        return "generator"
    return "neither (the offered load or the window limits the rate)"


def _sum(answers: Sequence[Answer], *path: str) -> int:
    total = 0
    for answer in answers:
        value: Any = answer
        for key in path:
            value = value[key]
        total += int(value)
    return total


def _merge_counts(answers: Sequence[Answer], key: str) -> dict[str, int]:
    merged: dict[str, int] = {}
    for answer in answers:
        for name, count in answer.get(key, {}).items():
            merged[name] = merged.get(name, 0) + int(count)
    return merged


def _consistency(
    answers: Sequence[Answer], before: Sequence[Answer] | None = None
) -> dict[str, Any]:
    """Exact totals of a drained load: sent must equal delivered + failed.

    ``before`` (the workers' totals when the load started) makes them this load's own.
    """

    def count(name: str) -> int:
        earlier = _sum(before, "totals", name) if before else 0
        return _sum(answers, "totals", name) - earlier

    sent, delivered, failed = count("sent"), count("delivered"), count("failed")
    accepted, stored = count("accepted"), count("stored")
    return {
        "sent": sent,
        "delivered": delivered,
        "accepted": accepted,
        "stored": stored,
        "failed": failed,
        "received": count("received"),
        "acks_answered": count("acks_answered"),
        "consistent": sent == delivered + accepted + stored + failed,
        # Every delivered message was seen by its receiver (1:1: exactly once).
        "received_matches": count("received") == delivered,
        "failure_reasons": _merge_counts(answers, "failure_reasons"),
        "errors": _merge_counts(answers, "errors"),
    }


def _names(prefix: str, count: int, parts: int) -> list[dict[str, Any]]:
    return [{"prefix": prefix, "start": start, "count": n} for start, n in split(count, parts)]


def _login(pool: WorkerPool, prefix: str, count: int, concurrency: int = 8) -> list[Answer]:
    slices = _names(prefix, count, len(pool))
    answers = pool.call(
        lambda i: {"cmd": "login", "password": PASSWORD, "concurrency": concurrency, **slices[i]},
        timeout=600,
    )
    failed = _sum(answers, "failed")
    if failed:
        raise RuntimeError(f"{failed} router logins failed: {_merge_counts(answers, 'errors')}")
    return answers


CONNECTS_IN_FLIGHT = 32
"""Handshakes under way at once, over all workers: below the listen backlog (50), so
no SYN is dropped and retried a second later, which would measure the backlog."""


def _connect(
    pool: WorkerPool,
    prefix: str,
    count: int,
    suite: str,
    transport: str = "tcp",
    resume: bool = False,
) -> list[Answer]:
    slices = _names(prefix, count, len(pool))
    concurrency = max(1, CONNECTS_IN_FLIGHT // len(pool))
    answers = pool.call(
        lambda i: {
            "cmd": "connect",
            "suite": suite,
            "concurrency": concurrency,
            "transport": transport,
            "resume": resume,
            **slices[i],
        },
        timeout=600,
    )
    failed = _sum(answers, "failed")
    if failed:
        raise RuntimeError(f"{failed} connections failed: {_merge_counts(answers, 'errors')}")
    return answers


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


def _warm_up(pool: WorkerPool, prefix: str, count: int) -> None:
    """A few logins and messages first, so lazy imports and caches are not measured."""
    _login(pool, prefix, count)
    _connect(pool, prefix, count, SUITES[0])
    pool.call({"cmd": "load", "window": 2}, 60)
    time.sleep(0.5)
    pool.call({"cmd": "stop_load", "timeout": 30}, 60)
    pool.call({"cmd": "close"}, 60)


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


@dataclass
class Interval:
    """A measured interval: daemon, generators and both cores, sampled at both ends."""

    start: ProcSample
    end: ProcSample
    generator_cpu: float
    cores_start: CoreSample
    cores_end: CoreSample
    services_cpu: float | None = None
    """CPU of the machine's PostgreSQL, Redis and RabbitMQ (external daemons only)."""

    def core_busy(self, core: int) -> float:
        return self.cores_end.busy_share_since(self.cores_start, core)


class _Meter:
    """Samples the daemon, the workers, both cores (and the services) at both ends."""

    def __init__(self, daemon: BenchDaemon, pool: WorkerPool) -> None:
        self.daemon = daemon
        self.pool = pool
        self.cores = sample_cores()
        self.services = sample_service_cpu() if daemon.settings.external else None
        self.start = daemon.sample()
        self.generators = pool.samples()

    def stop(self) -> Interval:
        end = self.daemon.sample()
        generator_cpu = cpu_between(self.generators, self.pool.samples())
        services = None
        if self.services is not None:
            services = sample_service_cpu() - self.services
        return Interval(self.start, end, generator_cpu, self.cores, sample_cores(), services)


def _measure(
    daemon: BenchDaemon, pool: WorkerPool, seconds: float, latency: bool
) -> tuple[Interval, list[Answer]]:
    pool.call({"cmd": "mark", "latency": latency}, 60)
    meter = _Meter(daemon, pool)
    time.sleep(seconds)
    reports = pool.call({"cmd": "report"}, 120)
    return meter.stop(), reports


def _shares(interval: Interval, work: int) -> dict[str, Any]:
    """CPU shares of both sides and both cores, which side saturated, CPU per unit."""
    start, end = interval.start, interval.end
    wall = end.wall_since(start)
    cpu = end.cpu_since(start)
    daemon_core = interval.core_busy(DAEMON_CPU)
    generator_core = interval.core_busy(GENERATOR_CPU)
    shares = {
        "seconds": wall,
        "daemon_cpu_share": _utilisation(cpu, wall),
        "generator_cpu_share": _utilisation(interval.generator_cpu, wall),
        "daemon_core_busy": daemon_core,
        "generator_core_busy": generator_core,
        "saturated": saturated_side(daemon_core, generator_core),
        "rss_kib": end.rss_kib,
        "daemon_cpu_us_per_unit": cpu * 1e6 / work if work else None,
        "generator_cpu_us_per_unit": interval.generator_cpu * 1e6 / work if work else None,
    }
    if interval.services_cpu is not None:
        shares["services_cpu_share"] = _utilisation(interval.services_cpu, wall)
        shares["services_cpu_us_per_unit"] = interval.services_cpu * 1e6 / work if work else None
    return shares


def _rates(interval: Interval, reports: Sequence[Answer]) -> dict[str, Any]:
    delivered = _sum(reports, "counts", "delivered")
    row = _shares(interval, delivered)
    wall = row["seconds"]
    row.update(
        delivered=delivered,
        delivered_per_s=delivered / wall if wall else 0.0,
        failed_in_window=_sum(reports, "counts", "failed"),
        daemon_cpu_us_per_message=row["daemon_cpu_us_per_unit"],
    )
    return row


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


def percentiles(sorted_samples: Sequence[int]) -> dict[str, Any]:
    """p50, p99, p99.9 and max in milliseconds (nearest-rank)."""
    count = len(sorted_samples)
    if not count:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}

    def rank(q: float) -> float:
        index = min(count - 1, max(0, math.ceil(q * count) - 1))
        return sorted_samples[index] / 1000

    return {
        "samples": count,
        "p50_ms": rank(0.50),
        "p99_ms": rank(0.99),
        "p999_ms": rank(0.999),
        "max_ms": sorted_samples[-1] / 1000,
    }


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


# -------------------------------------------------------------------------- profile


def py_spy_profiler(out_dir: str, log: Log) -> Callable[[int, float], dict[str, Any]] | None:
    """A function that samples a pid with py-spy, or None if py-spy is not installed."""
    binary = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(binary):
        log("py-spy is not installed: no profile (pip install py-spy==0.4.3)")
        return None

    def profile(pid: int, seconds: float) -> dict[str, Any]:
        raw = os.path.join(out_dir, "profile.folded")
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        completed = subprocess.run(
            [
                binary,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                raw,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        if completed.returncode != 0 or not os.path.exists(raw):
            return {"error": completed.stderr.strip()[-500:], "tool": version}
        with open(raw, encoding="utf-8") as handle:
            return {"tool": version, **summarise_folded(handle.read())}

    return profile


REACTOR_FRAME = "mainLoop ("


def summarise_folded(text: str, top: int = 25) -> dict[str, Any]:
    """Own and inclusive shares per function of the reactor thread's py-spy samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        # Only the reactor thread: the idle database and KDF pool threads sit in
        # Condition.wait, which py-spy does not count as idle.
        if not stack or not count_text.isdigit() or REACTOR_FRAME not in stack:
            continue
        count = int(count_text)
        frames = [_short_frame(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        rows = sorted(table.items(), key=lambda item: -item[1])
        # Frames on every stack (twistd's start-up chain, the reactor loop) say nothing.
        rows = [(name, count) for name, count in rows if count < 0.99 * total][:top]
        return [(name, 100.0 * count / total) for name, count in rows]

    return {"samples": total, "own": ranked(own), "inclusive": ranked(inclusive)}


def _short_frame(frame: str) -> str:
    """``function (path/to/module.py:123)`` -> ``function (module.py)``; lines dropped."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    for marker in ("site-packages", "main", "cim_head"):
        if marker in parts:
            parts = parts[parts.index(marker) + 1 :]
            break
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})" if where else name


def plan_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
