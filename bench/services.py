"""The external backends for figure 6: the machine's PostgreSQL, Redis and RabbitMQ.

The services are shared with other people's test suites, so a benchmark daemon gets
nothing of theirs and leaves nothing behind:

- PostgreSQL: a database of its own (``cim_bench_<run>``), created on the ``postgres``
  database, migrated with the daemon's own migrations, dropped afterwards (``WITH
  (FORCE)``, so a daemon killed mid-transaction cannot keep it alive);
- Redis: a database number of its own, the highest one that is empty (or holds only
  the leftovers of an earlier benchmark, recognised by ``CLAIM_KEY``), claimed with
  that key and flushed afterwards. The daemon's keys live under ``cim:``, so the claim
  key is never one of them;
- RabbitMQ: an exchange, node id (hence node queue), offline queue and archive queue
  named after the run, deleted afterwards.

Only loopback addresses are accepted: the benchmark never talks to another host.
Every call has a timeout, and every loop is bounded.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pika
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from bench.daemon import CLOCK_TICKS
from cim.backends.bus import node_queue
from cim.storage.database import upgrade

POSTGRESQL_ADMIN_URL = os.environ.get(
    "CIM_BENCH_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
"""A superuser connection to a database that exists (to create and drop ours)."""
REDIS_HOST = os.environ.get("CIM_BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CIM_BENCH_REDIS_PORT", "6379"))
AMQP_URL = os.environ.get("CIM_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CLAIM_KEY = "cim-bench:claim"
STALE_CLAIM = 6 * 3600.0
REDIS_DATABASES = 16
TIMEOUT = 10.0
SERVICE_PROCESSES = ("redis-server", "beam.smp", "postgres")
"""Process names whose CPU is read beside the daemon's (all of them, whoever uses them)."""


class ServicesUnavailable(Exception):
    """A service could not be reached or prepared; the message says which and why."""


def _loopback(host: str | None, what: str) -> None:
    if host not in LOOPBACK:
        raise ServicesUnavailable(f"{what} must be on loopback, not {host!r}")


# --------------------------------------------------------------------------- Redis


class RedisConnection:
    """Just enough RESP for SELECT, DBSIZE, EXISTS, SET and FLUSHDB; no library needed."""

    def __init__(self, host: str, port: int) -> None:
        _loopback(host, "Redis")
        try:
            self._sock = socket.create_connection((host, port), timeout=TIMEOUT)
        except OSError as exc:
            raise ServicesUnavailable(f"Redis at {host}:{port}: {exc}") from None
        self._file = self._sock.makefile("rb")

    def call(self, *args: str | int) -> Any:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._reply()

    def _reply(self) -> Any:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ServicesUnavailable("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise ServicesUnavailable(f"Redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._file.read(size + 2)
            return data[:-2].decode()
        if kind == b"*":
            return [self._reply() for _ in range(max(0, int(rest)))]
        raise ServicesUnavailable(f"Redis: unexpected reply {line[:40]!r}")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def claim_redis_db(run_id: str, host: str = REDIS_HOST, port: int = REDIS_PORT) -> int:
    """The highest database number nobody uses, marked as this run's.

    A database holding data is someone else's, unless ``CLAIM_KEY`` says an earlier
    benchmark claimed it more than ``STALE_CLAIM`` seconds ago (it crashed before
    cleaning up): that one is flushed and reused.
    """
    redis = RedisConnection(host, port)
    try:
        for db in range(REDIS_DATABASES - 1, 0, -1):
            redis.call("SELECT", db)
            if redis.call("DBSIZE"):
                claim = redis.call("GET", CLAIM_KEY)
                if claim is None:
                    continue
                _, _, stamp = str(claim).partition(" ")
                try:
                    age = time.time() - float(stamp)
                except ValueError:
                    continue
                if age < STALE_CLAIM:
                    continue  # another benchmark, still running
                redis.call("FLUSHDB")
            if redis.call("SET", CLAIM_KEY, f"{run_id} {time.time():.0f}", "NX") == "OK":
                return db
    finally:
        redis.close()
    raise ServicesUnavailable(f"Redis at {host}:{port} has no free database (1-15)")


def flush_redis_db(db: int, host: str = REDIS_HOST, port: int = REDIS_PORT) -> None:
    redis = RedisConnection(host, port)
    try:
        redis.call("SELECT", db)
        redis.call("FLUSHDB")
    finally:
        redis.close()


# ---------------------------------------------------------------------- PostgreSQL


def _admin_engine() -> Any:
    url = make_url(POSTGRESQL_ADMIN_URL)
    _loopback(url.host, "PostgreSQL")
    return create_engine(
        url.set(drivername="postgresql+psycopg2"),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": int(TIMEOUT)},
    )


def create_database(name: str) -> str:
    """A new, empty database migrated to the code's schema; returns its URL."""
    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        raise ServicesUnavailable(f"PostgreSQL: cannot create {name}: {exc}") from None
    finally:
        engine.dispose()
    url = make_url(POSTGRESQL_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url


def drop_database(name: str) -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()


# ------------------------------------------------------------------------ RabbitMQ


def _amqp_parameters() -> pika.URLParameters:
    _loopback(urlsplit(AMQP_URL).hostname, "RabbitMQ")
    parameters = pika.URLParameters(AMQP_URL)
    parameters.socket_timeout = TIMEOUT
    parameters.stack_timeout = TIMEOUT
    parameters.blocked_connection_timeout = TIMEOUT
    parameters.connection_attempts = 1
    return parameters


def check_rabbitmq() -> None:
    try:
        connection = pika.BlockingConnection(_amqp_parameters())
    except Exception as exc:
        raise ServicesUnavailable(f"RabbitMQ at {AMQP_URL.split('@')[-1]}: {exc!r}") from None
    connection.close()


def delete_amqp(exchange: str, queues: list[str]) -> None:
    connection = pika.BlockingConnection(_amqp_parameters())
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
        channel.exchange_delete(exchange)
    finally:
        connection.close()


# ------------------------------------------------------------------------- together


@dataclass
class ExternalServices:
    """One daemon's private share of the three services: ``open``, ``config_text``,
    ``close`` (which undoes everything ``open`` did, as far as it got)."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    database: str = ""
    database_url: str = ""
    redis_db: int | None = None
    opened: bool = False
    nodes: int = 1
    """Daemons sharing these services (bench.distributed runs two): each has a node id
    and so a node queue of its own."""

    @property
    def node_id(self) -> str:
        return f"bench-{self.run_id}"

    @property
    def node_ids(self) -> list[str]:
        return [self.node_id] + [f"{self.node_id}-{n}" for n in range(1, self.nodes)]

    @property
    def exchange(self) -> str:
        return f"cim.bench.{self.run_id}"

    @property
    def queues(self) -> list[str]:
        return [
            *(node_queue(node) for node in self.node_ids),
            f"{self.exchange}.offline",
            f"{self.exchange}.archive",
        ]

    def open(self) -> None:
        try:
            check_rabbitmq()
            self.redis_db = claim_redis_db(self.run_id)
            self.database = f"cim_bench_{self.run_id}"
            self.database_url = create_database(self.database)
        except BaseException:
            self.close()
            raise
        self.opened = True

    def config_text(self) -> str:
        assert self.redis_db is not None and self.database_url
        return (
            f"[state]\nbackend = redis\n"
            f"redis_url = redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}\n"
            f"[queue]\nbackend = rabbitmq\namqp_url = {AMQP_URL}\nexchange = {self.exchange}\n"
            f"[offline]\nqueue = {self.exchange}.offline\n"
            f"[archive]\nqueue = {self.exchange}.archive\n"
            f"[database]\nurl = {self.database_url}\n"
        )

    def close(self) -> list[str]:
        """Undo ``open``; returns what could not be cleaned (for the run's notes)."""
        problems = []
        try:
            delete_amqp(self.exchange, self.queues)
        except Exception as exc:
            problems.append(f"RabbitMQ {self.exchange}: {exc!r}")
        if self.database:
            try:
                drop_database(self.database)
            except Exception as exc:
                problems.append(f"PostgreSQL {self.database}: {exc!r}")
            self.database = ""
        if self.redis_db is not None:
            try:
                flush_redis_db(self.redis_db)
            except Exception as exc:
                problems.append(f"Redis db {self.redis_db}: {exc!r}")
            self.redis_db = None
        self.opened = False
        return problems


# ------------------------------------------------------------------- service CPU


def sample_service_cpu() -> float:
    """CPU seconds used so far by every live process of the three services.

    Shared services: other programs' use of them is counted too, and a process that
    exited between two samples (a PostgreSQL backend of a closed connection) drops
    out. So this is an indication, printed beside the daemon's own figure, which
    stays the one that is compared with the targets.
    """
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        if name not in SERVICE_PROCESSES:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def wait_until(check: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``check()`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return bool(check())
