"""The steps every benchmark scenario is made of: log users in, connect them, measure
an interval (the daemon, the workers and both cores, sampled at both ends), and check
that the workers' counts add up. ``bench.scenarios`` and the scenario modules beside it
(``steady``, ``catch_up``, ``gateway``, ...) are built from these.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.daemon import BenchDaemon, CoreSample, ProcSample, sample_cores
from bench.services import sample_service_cpu
from bench.workers import Answer, WorkerPool, cpu_between, split

Log = Callable[[str], None]

PASSWORD = "bench-password"
SUITES = ("chacha20-poly1305", "rc4-hmac-sha256")
DAEMON_CPU = 0
GENERATOR_CPU = 1
SATURATED = 0.85
"""A side using at least this share of its core is the one that limits the rate.

Not 100 %: a saturated side still waits a little for the other between bursts, and
/proc counts CPU in 10 ms ticks."""


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


def _warm_up(pool: WorkerPool, prefix: str, count: int) -> None:
    """A few logins and messages first, so lazy imports and caches are not measured."""
    _login(pool, prefix, count)
    _connect(pool, prefix, count, SUITES[0])
    pool.call({"cmd": "load", "window": 2}, 60)
    time.sleep(0.5)
    pool.call({"cmd": "stop_load", "timeout": 30}, 60)
    pool.call({"cmd": "close"}, 60)


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
