"""``python -m bench.scaling``: three nodes on real backends, counted, and scaled up.

Measures what one message and one connection cost each component of a cluster, by
counting at the components themselves, never from the code's intentions:

- cim: the three daemons' CPU (``/proc``) and RSS;
- Redis: a private ``redis-server`` (nobody else's commands in its INFO), its
  ``commandstats`` calls, ``used_memory`` and its own CPU, before and after;
- RabbitMQ: the shared broker, a run-private exchange; a tap queue bound with every
  node's routing key receives a copy of each bus message, so its length is the
  number published;
- PostgreSQL: a run-private database; ``pg_stat_database`` commits and rows.

Phases: log in and connect ``2 * pairs`` users through node 1's router (the ring
places them on the three nodes), hold them idle (background cost per connection), then
send ``rate`` msg/s 1:1 for ``seconds`` (cost per message). ``project`` turns the
figures into what one million connected users at 10,000 and 100,000 msg/s need, and
``markdown`` into the table of docs/scaling.md; ``--report JSON`` redoes that from a
saved run (``--docs`` rewrites the marked section of docs/scaling.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import pika
from sqlalchemy import text

from bench.daemon import ROOT, BenchDaemon, DaemonSettings, free_port, sample_process
from bench.services import (
    AMQP_URL,
    RedisConnection,
    _amqp_parameters,
    create_database,
    delete_amqp,
    drop_database,
    wait_until,
)
from bench.steps import GENERATOR_CPU, PASSWORD, SUITES, _connect, _consistency, _login, _sum
from bench.workers import WorkerPool
from cim.backends.bus import node_queue
from cim.storage.database import open_engine

DOCS = os.path.join(ROOT, "docs", "scaling.md")
BEGIN = "<!-- scaling:begin (written by python -m bench.scaling) -->"
END = "<!-- scaling:end -->"
NODES = 3
USERS = 1_000_000
RATES = (10_000, 100_000)
CORE_BUDGET = 0.6
"""Share of a core a single-threaded process (a cim node, a Redis shard, a RabbitMQ
queue) is planned at: headroom for bursts, reconnect storms and a node's failure."""
DEDUP_WINDOW = 600.0


# ------------------------------------------------------------------ private Redis


class PrivateRedis:
    """A redis-server of the run's own: its INFO counts cim's commands and no one else's."""

    def __init__(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="cim-scaling-redis-")
        self.process = subprocess.Popen(
            [
                executable,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_until(self._answers, 10.0):
            self.stop()
            raise RuntimeError("the private redis-server did not answer")

    def _answers(self) -> bool:
        try:
            connection = RedisConnection("127.0.0.1", self.port)
        except Exception:
            return False
        connection.close()
        return True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def info(self) -> dict[str, Any]:
        """Commands by name, total calls, used memory and the server's CPU seconds."""
        connection = RedisConnection("127.0.0.1", self.port)
        try:
            stats = str(connection.call("INFO", "commandstats"))
            memory = str(connection.call("INFO", "memory"))
        finally:
            connection.close()
        commands: dict[str, int] = {}
        for line in stats.splitlines():
            if line.startswith("cmdstat_"):
                name, fields = line[len("cmdstat_") :].split(":", 1)
                commands[name] = int(fields.split("calls=", 1)[1].split(",", 1)[0])
        used = 0
        for line in memory.splitlines():
            if line.startswith("used_memory:"):
                used = int(line.split(":", 1)[1])
        return {
            "commands": commands,
            "calls": sum(commands.values()),
            "used_memory": used,
            "cpu": sample_process(self.process.pid).cpu,
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


def redis_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    names = set(before["commands"]) | set(after["commands"])
    commands = {
        name: after["commands"].get(name, 0) - before["commands"].get(name, 0) for name in names
    }
    commands.pop("info", None)  # our own probe
    return {
        "calls": sum(commands.values()),
        "commands": {name: n for name, n in sorted(commands.items()) if n},
        "used_memory": after["used_memory"] - before["used_memory"],
        "cpu": after["cpu"] - before["cpu"],
    }


# ------------------------------------------------------------ RabbitMQ and PostgreSQL


class BusTap:
    """A queue bound to the run's exchange with every node's key: one copy per publish.

    Made once the nodes have declared the exchange (their declaration is the one that
    counts). Its messages are never consumed; it is deleted at the end of the run.
    """

    def __init__(self, exchange: str, node_ids: list[str]) -> None:
        self.name = f"{exchange}.tap"
        self._connection = pika.BlockingConnection(_amqp_parameters())
        self._channel = self._connection.channel()
        self._channel.queue_declare(self.name, auto_delete=False, durable=False)
        for node_id in node_ids:
            self._channel.queue_bind(self.name, exchange, routing_key=node_id)

    def count(self) -> int:
        frame = self._channel.queue_declare(self.name, passive=True)
        return int(frame.method.message_count)

    def purge(self) -> None:
        self._channel.queue_purge(self.name)

    def close(self) -> None:
        try:
            self._channel.queue_delete(self.name)
        finally:
            self._connection.close()


def pg_stats(url: str, database: str) -> dict[str, int]:
    """Commits and rows of ``database`` (after the statistics collector caught up)."""
    engine = open_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_stat_clear_snapshot()"))
            row = connection.execute(
                text(
                    "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, tup_fetched "
                    "FROM pg_stat_database WHERE datname = :name"
                ),
                {"name": database},
            ).one()
    finally:
        engine.dispose()
    keys = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted", "tup_fetched")
    return {key: int(value) for key, value in zip(keys, row, strict=True)}


# --------------------------------------------------------------------------- the run


def _node_config(redis: PrivateRedis, zookeeper: str, database_url: str, exchange: str) -> str:
    return (
        f"[state]\nbackend = redis\nredis_url = {redis.url}\n"
        f"[registry]\nbackend = zookeeper\nzookeeper_hosts = {zookeeper}\n"
        f"[queue]\nbackend = rabbitmq\namqp_url = {AMQP_URL}\nexchange = {exchange}\n"
        f"[offline]\nqueue = {exchange}.offline\n"
        f"[archive]\nqueue = {exchange}.archive\n"
        f"[database]\nurl = {database_url}\n"
    )


def measure(
    workdir: str, pairs: int, rate: int, seconds: float, idle_seconds: float, log: Any
) -> dict[str, Any]:
    """The three-node run (module docstring); returns plain data for ``project``."""
    sys.path.insert(0, ROOT)  # the tests' support package: the private ZooKeeper
    from tests.integration.support.zookeeper import PrivateZooKeeper

    run_id = uuid.uuid4().hex[:10]
    exchange = f"cim.bench.{run_id}"
    node_ids = [f"scale-{run_id}-{i + 1}" for i in range(NODES)]
    database = f"cim_bench_{run_id}"
    users = 2 * pairs
    zookeeper = PrivateZooKeeper()
    redis: PrivateRedis | None = None
    tap: BusTap | None = None
    daemons: list[BenchDaemon] = []
    database_url = ""
    result: dict[str, Any] = {"nodes": NODES, "pairs": pairs, "connections": users}
    try:
        zookeeper.start()
        redis = PrivateRedis()
        database_url = create_database(database)
        extra = _node_config(redis, zookeeper.hosts, database_url, exchange)
        for node_id in node_ids:
            settings = DaemonSettings(
                heartbeat_interval=30.0, node_id=node_id, extra_config=extra, external=True
            )
            daemons.append(BenchDaemon(os.path.join(workdir, node_id), settings))
        daemons[0].add_users((f"u{n}" for n in range(users)), PASSWORD)
        for daemon in daemons:
            daemon.start()
        time.sleep(3.0)  # every router sees the three nodes in ZooKeeper
        tap = BusTap(exchange, node_ids)  # the nodes declared the exchange
        # The nodes' own background (timers, ZooKeeper, Redis housekeeping) with no
        # client: taken out of the cost of an idle connection below.
        log(f"scaling: {NODES} nodes without clients for {idle_seconds / 2:.0f} s")
        empty_start, redis_empty = [d.sample() for d in daemons], redis.info()
        time.sleep(idle_seconds / 2)
        empty_end = [d.sample() for d in daemons]
        empty_redis = redis_delta(redis_empty, redis.info())
        rss_empty = [d.rss_kib for d in empty_end]
        with WorkerPool(2, daemons[0].router_url, GENERATOR_CPU, workdir) as pool:
            log(f"scaling: {users} users log in and connect to {NODES} nodes")
            _login(pool, "u", users)
            _connect(pool, "u", users, SUITES[0])
            time.sleep(1.0)
            log(f"scaling: {users} connections idle for {idle_seconds:.0f} s")
            idle_start = [d.sample() for d in daemons]
            redis_idle = redis.info()
            time.sleep(idle_seconds)
            idle_end = [d.sample() for d in daemons]
            idle_redis = redis_delta(redis_idle, redis.info())
            tap.purge()
            log(f"scaling: {rate} msg/s for {seconds:.0f} s, {pairs} pairs")
            before = pool.call({"cmd": "totals"}, 60)
            pool.call({"cmd": "load", "rate": rate / len(pool)}, 60)
            time.sleep(2.0)
            pool.call({"cmd": "mark", "latency": False}, 60)
            start = [d.sample() for d in daemons]
            redis_start, pg_start, tap_start = (
                redis.info(),
                pg_stats(database_url, database),
                tap.count(),
            )
            time.sleep(seconds)
            reports = pool.call({"cmd": "report"}, 120)
            end = [d.sample() for d in daemons]
            redis_end, tap_end = redis.info(), tap.count()
            time.sleep(1.0)  # PostgreSQL reports a backend's counts at its next idle moment
            pg_end = pg_stats(database_url, database)
            drained = pool.call({"cmd": "stop_load", "timeout": 30}, 120)
            pool.call({"cmd": "close"}, 120)
        # Messages the cluster took and answered in the window: delivered live, or
        # stored for a receiver that did not ack in time. Refusals (UNAVAILABLE) are not
        # messages the backends carried; they are reported beside.
        delivered = sum(_sum(reports, "counts", k) for k in ("delivered", "stored", "accepted"))
        refused = _sum(reports, "counts", "failed")
        wall = max(e.wall_since(s) for s, e in zip(start, end, strict=True))
        idle_wall = max(e.wall_since(s) for s, e in zip(idle_start, idle_end, strict=True))
        result.update(
            {
                "rss_empty_kib": rss_empty,
                "empty": {
                    "seconds": max(
                        e.wall_since(s) for s, e in zip(empty_start, empty_end, strict=True)
                    ),
                    "daemon_cpu": sum(
                        e.cpu_since(s) for s, e in zip(empty_start, empty_end, strict=True)
                    ),
                    "redis": empty_redis,
                },
                "rss_connected_kib": [s.rss_kib for s in idle_start],
                "idle": {
                    "seconds": idle_wall,
                    "daemon_cpu": sum(
                        e.cpu_since(s) for s, e in zip(idle_start, idle_end, strict=True)
                    ),
                    "redis": idle_redis,
                },
                "load": {
                    "offered_per_s": rate,
                    "seconds": wall,
                    "delivered": delivered,
                    "failed": refused,
                    "daemon_cpu": [e.cpu_since(s) for s, e in zip(start, end, strict=True)],
                    "rss_kib": [e.rss_kib for e in end],
                    "redis": redis_delta(redis_start, redis_end),
                    "bus_messages": tap_end - tap_start,
                    "postgresql": {k: pg_end[k] - pg_start[k] for k in pg_start},
                    "totals": _consistency(drained, before),
                },
                "loadavg": os.getloadavg(),
            }
        )
    finally:
        for daemon in daemons:
            daemon.stop()
        if tap is not None:
            tap.close()
        try:
            delete_amqp(exchange, [node_queue(n) for n in node_ids])
        except Exception as exc:
            log(f"cleaning up RabbitMQ: {exc!r}")
        if database_url:
            drop_database(database)
        if redis is not None:
            redis.stop()
        zookeeper.stop()
    return result


# ----------------------------------------------------------------------- projecting


def per_unit(run: dict[str, Any]) -> dict[str, float]:
    """The measured costs: per message, per connection (and per second of it)."""
    load, idle = run["load"], run["idle"]
    delivered = max(load["delivered"], 1)
    connections = run["connections"]
    pg = load["postgresql"]
    rss_per_conn = (sum(run["rss_connected_kib"]) - sum(run["rss_empty_kib"])) / connections
    # Per second with the connections idle, less per second with none (the nodes' own).
    empty = run.get("empty") or {"seconds": 1.0, "daemon_cpu": 0.0, "redis": {"calls": 0}}
    idle_cpu = idle["daemon_cpu"] / idle["seconds"] - empty["daemon_cpu"] / empty["seconds"]
    idle_ops = idle["redis"]["calls"] / idle["seconds"] - empty["redis"]["calls"] / empty["seconds"]
    return {
        "cim_cpu_us_per_msg": sum(load["daemon_cpu"]) * 1e6 / delivered,
        "cim_idle_cpu_us_per_conn_s": max(idle_cpu, 0.0) * 1e6 / connections,
        "cim_rss_kib_per_conn": rss_per_conn,
        "redis_ops_per_msg": load["redis"]["calls"] / delivered,
        "redis_ops_per_conn_s": max(idle_ops, 0.0) / connections,
        "redis_cpu_us_per_op": load["redis"]["cpu"] * 1e6 / max(load["redis"]["calls"], 1),
        "redis_bytes_per_msg": load["redis"]["used_memory"] / delivered,
        "bus_msgs_per_msg": load["bus_messages"] / delivered,
        "pg_xacts_per_msg": pg["xact_commit"] / delivered,
        "pg_rows_written_per_msg": (pg["tup_inserted"] + pg["tup_updated"] + pg["tup_deleted"])
        / delivered,
        "pg_rows_inserted_per_msg": pg["tup_inserted"] / delivered,
    }


def project(
    run: dict[str, Any], users: int = USERS, rates: tuple[int, ...] = RATES
) -> list[dict[str, Any]]:
    """What ``users`` connected users sending ``rate`` msg/s need, per rate.

    cim nodes: the larger of the cores (messages and idle connections, each node one
    core planned at CORE_BUDGET) and memory at 8 GiB per node. Bus messages scale with
    the share of messages crossing nodes: measured at NODES nodes, (n-1)/n at n nodes.
    """
    unit = per_unit(run)
    measured_cross = (NODES - 1) / NODES
    rows = []
    for rate in rates:
        cores = (
            rate * unit["cim_cpu_us_per_msg"] + users * unit["cim_idle_cpu_us_per_conn_s"]
        ) / 1e6
        memory_gib = users * unit["cim_rss_kib_per_conn"] / 2**20
        nodes = max(math.ceil(cores / CORE_BUDGET), math.ceil(memory_gib / 8), 1)
        cross = (nodes - 1) / nodes if nodes > 1 else 0.0
        redis_ops = rate * unit["redis_ops_per_msg"] + users * unit["redis_ops_per_conn_s"]
        redis_cores = redis_ops * unit["redis_cpu_us_per_op"] / 1e6
        rows.append(
            {
                "rate": rate,
                "cim_cores": cores,
                "cim_nodes": nodes,
                "cim_memory_gib": memory_gib,
                "redis_ops_per_s": redis_ops,
                "redis_shards": max(1, math.ceil(redis_cores / CORE_BUDGET)),
                "redis_receipts_gib": rate * DEDUP_WINDOW * unit["redis_bytes_per_msg"] / 2**30,
                "bus_msgs_per_s": rate * unit["bus_msgs_per_msg"] * cross / measured_cross,
                "pg_xacts_per_s": rate * unit["pg_xacts_per_msg"],
                "pg_rows_per_s": rate * unit["pg_rows_written_per_msg"],
            }
        )
    return rows


def markdown(run: dict[str, Any]) -> str:
    unit = per_unit(run)
    load = run["load"]
    when = run.get("when", "")
    lines = [
        BEGIN,
        f"Measured {when} on this machine (busy: load average "
        f"{', '.join(f'{x:.1f}' for x in run['loadavg'])}; the lead regenerates these on a "
        f"quiet one): {NODES} nodes on one core, {run['connections']} connections, "
        f"{load['offered_per_s']:,} msg/s offered for {load['seconds']:.0f} s, "
        f"{load['delivered']:,} taken (delivered or stored), {load.get('failed', 0):,} refused "
        f"(counts {'exact' if load['totals']['consistent'] else 'WRONG'}).",
        "",
        "| measured cost | value |",
        "|---|---|",
        f"| cim CPU per message (3 nodes summed) | {unit['cim_cpu_us_per_msg']:.0f} µs |",
        f"| cim CPU per idle connection | {unit['cim_idle_cpu_us_per_conn_s']:.2f} µs/s |",
        f"| cim RSS per connection | {unit['cim_rss_kib_per_conn']:.1f} KiB |",
        f"| Redis commands per message | {unit['redis_ops_per_msg']:.2f} |",
        f"| Redis commands per connection per second (idle) | {unit['redis_ops_per_conn_s']:.3f} |",
        f"| Redis CPU per command | {unit['redis_cpu_us_per_op']:.1f} µs |",
        f"| Redis memory per message (held for the dedup window) | "
        f"{unit['redis_bytes_per_msg']:.0f} B |",
        f"| RabbitMQ messages per message ({NODES} nodes) | {unit['bus_msgs_per_msg']:.2f} |",
        f"| PostgreSQL commits per message | {unit['pg_xacts_per_msg']:.3f} |",
        f"| PostgreSQL rows written per message | {unit['pg_rows_written_per_msg']:.2f} |",
        "",
        "Redis commands during the load: "
        + ", ".join(f"{k} {v:,}" for k, v in load["redis"]["commands"].items())
        + ".",
        "",
        f"| {USERS:,} users | cim cores | cim nodes | cim memory | Redis ops/s | Redis shards "
        "| Redis receipts | RabbitMQ msg/s | PostgreSQL commits/s | PostgreSQL rows/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in project(run):
        lines.append(
            f"| {row['rate']:,} msg/s | {row['cim_cores']:.1f} | {row['cim_nodes']} | "
            f"{row['cim_memory_gib']:.1f} GiB | {row['redis_ops_per_s']:,.0f} | "
            f"{row['redis_shards']} | {row['redis_receipts_gib']:.2f} GiB | "
            f"{row['bus_msgs_per_s']:,.0f} | {row['pg_xacts_per_s']:,.0f} | "
            f"{row['pg_rows_per_s']:,.0f} |"
        )
    lines.append(END)
    return "\n".join(lines)


def write_docs(section: str) -> None:
    with open(DOCS, encoding="utf-8") as handle:
        current = handle.read()
    head, rest = current.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(DOCS, "w", encoding="utf-8") as handle:
        handle.write(head + section + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--report", metavar="JSON", help="project a saved run, run nothing")
    parser.add_argument("--docs", action="store_true", help="rewrite docs/scaling.md's table")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--rate", type=int, default=500, help="msg/s offered (all pairs)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as handle:
            run = json.load(handle)
    else:
        began = time.monotonic()

        def log(message: str) -> None:
            print(f"[{time.monotonic() - began:6.1f} s] {message}", flush=True)

        stamp = datetime.datetime.now(datetime.UTC)
        workdir = os.path.join(ROOT, "bench", "results", stamp.strftime("%Y%m%dT%H%M%SZ-scaling"))
        os.makedirs(workdir, exist_ok=True)
        run = measure(workdir, args.pairs, args.rate, args.seconds, args.idle_seconds, log)
        run["when"] = stamp.strftime("%Y-%m-%d %H:%M UTC")
        path = workdir + ".json"
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(run, handle, indent=1)
        print(f"raw results: {os.path.relpath(path, ROOT)}")
    section = markdown(run)
    print(section)
    if args.docs:
        write_docs(section)
        print(f"rewrote {os.path.relpath(DOCS, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
