"""The sections of the backends and the node's own plumbing: log, state, registry,
queue, database, offline, archive, limits."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from cim.config.values import (
    ConfigError,
    _opt,
    parse_bool,
    parse_duration,
    parse_int,
    parse_rate,
    parse_size,
    parse_str,
)

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


@dataclass(frozen=True)
class LogConfig:
    section: ClassVar[str] = "log"
    # text: twistd's human-readable lines; json: one JSON object per line.
    format: str = _opt("text", parse_str, choices=LOG_FORMATS)
    # The lowest level written.
    level: str = _opt("info", parse_str, choices=LOG_LEVELS)
    # Empty: where twistd logs (--logfile, stdout with --nodaemon). SIGHUP reopens it.
    file: str = _opt("", parse_str)
    # One line per HTTP request (router, logic, files, admin) in the daemon's log.
    access_log: bool = _opt(False, parse_bool)

    def validate(self) -> None:
        pass

    @property
    def is_default(self) -> bool:
        """Nothing to change in twistd's own logging."""
        return self.format == "text" and self.level == "info" and not self.file


@dataclass(frozen=True)
class StateConfig:
    section: ClassVar[str] = "state"
    backend: str = _opt("memory", parse_str, choices=("memory", "redis"))
    redis_url: str = _opt("redis://127.0.0.1:6379/0", parse_str)
    redis_timeout: float = _opt(5.0, parse_duration, minimum=0.1)
    route_ttl: float = _opt(60.0, parse_duration, minimum=3)
    dedup_window: float = _opt(600.0, parse_duration, minimum=60)

    def validate(self) -> None:
        if not self.redis_url.startswith(("redis://", "unix://")):
            raise ConfigError(
                "state", "redis_url", self.redis_url, "expected redis://host:port/db or unix://path"
            )


@dataclass(frozen=True)
class RegistryConfig:
    section: ClassVar[str] = "registry"
    backend: str = _opt("local", parse_str, choices=("local", "zookeeper"))
    zookeeper_hosts: str = _opt("127.0.0.1:2181", parse_str)
    path: str = _opt("/cim/nodes", parse_str)
    session_timeout: float = _opt(10.0, parse_duration, minimum=2, maximum=600)

    def validate(self) -> None:
        if not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", self.path):
            raise ConfigError(
                "registry", "path", self.path, "expected an absolute ZooKeeper path like /cim/nodes"
            )


@dataclass(frozen=True)
class QueueConfig:
    section: ClassVar[str] = "queue"
    backend: str = _opt("memory", parse_str, choices=("memory", "rabbitmq"))
    amqp_url: str = _opt("amqp://guest:guest@127.0.0.1:5672/%2F", parse_str)
    confirm_timeout: float = _opt(5.0, parse_duration, minimum=0.1)
    exchange: str = _opt("cim.nodes", parse_str)

    def validate(self) -> None:
        if not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise ConfigError(
                "queue",
                "amqp_url",
                _hide_password(self.amqp_url),
                "expected amqp://user:pass@host/vhost",
            )


def _hide_password(url: str) -> str:
    """URLs in error messages and logs never show a password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@dataclass(frozen=True)
class DatabaseConfig:
    section: ClassVar[str] = "database"
    url: str = _opt("", parse_str)
    threads: int = _opt(4, parse_int, minimum=1, maximum=64)

    def validate(self) -> None:
        if self.url and not self.url.startswith(("sqlite://", "postgresql://", "postgresql+")):
            raise ConfigError(
                "database", "url", self.url, "expected a sqlite:// or postgresql:// URL"
            )


@dataclass(frozen=True)
class OfflineConfig:
    section: ClassVar[str] = "offline"
    max_per_user: int = _opt(10000, parse_int, minimum=1)
    page_size: int = _opt(100, parse_int, minimum=1, maximum=1000)
    queue: str = _opt("cim.offline", parse_str)
    max_queued: int = _opt(1_000_000, parse_int, minimum=1)
    writer: bool = _opt(True, parse_bool)
    batch_size: int = _opt(200, parse_int, minimum=1, maximum=10000)
    batch_wait: float = _opt(0.0, parse_duration, minimum=0, maximum=60)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", self.queue):
            raise ConfigError(
                "offline", "queue", self.queue, "expected a RabbitMQ queue name like cim.offline"
            )


@dataclass(frozen=True)
class ArchiveConfig:
    """Retention and backlog of the timelines (cim.history.timeline); see docs/operations.md
    for the keys the archive pipeline had that no longer do anything."""

    section: ClassVar[str] = "archive"
    enabled: bool = _opt(True, parse_bool)
    writer: bool = _opt(True, parse_bool)
    queue: str = _opt("cim.archive", parse_str)
    retention_days: int = _opt(0, parse_int, minimum=0)
    batch_size: int = _opt(500, parse_int, minimum=1, maximum=10000)
    batch_wait: float = _opt(1.0, parse_duration, minimum=0.001, maximum=3600)
    max_buffer: int = _opt(50000, parse_int, minimum=1)
    purge_interval: float = _opt(3600.0, parse_duration, minimum=0)
    purge_batch: int = _opt(1000, parse_int, minimum=1, maximum=100000)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,255}", self.queue):
            raise ConfigError(
                "archive", "queue", self.queue, "use 1-255 letters, digits, '.', '_', ':' or '-'"
            )


@dataclass(frozen=True)
class LimitsConfig:
    """Rate limits and bounds against floods (cim.limits): token buckets per user or
    per address (a rate and the burst that may be saved up), and the fan-out backlog.

    A user's own limits can be raised with ``cimctl limits``; the nodes read those
    every ``override_refresh``.
    """

    section: ClassVar[str] = "limits"
    # Every msg:R of a user (1:1 and group, all devices together).
    messages: float = _opt(50.0, parse_rate, minimum=0)
    messages_burst: int = _opt(200, parse_int, minimum=1)
    # Group posts of a user, on top of messages: each costs a delivery per member.
    group_posts: float = _opt(10.0, parse_rate, minimum=0)
    group_posts_burst: int = _opt(50, parse_int, minimum=1)
    # Posts into one group, all its members together.
    group_messages: float = _opt(50.0, parse_rate, minimum=0)
    group_messages_burst: int = _opt(200, parse_int, minimum=1)
    # Group messages waiting for their fan-out on this node, per group; and deliveries
    # (messages times members) and bytes waiting, all groups together. Past either,
    # posts are refused before they are accepted.
    group_backlog: int = _opt(1000, parse_int, minimum=1)
    fanout_backlog: int = _opt(200_000, parse_int, minimum=1)
    fanout_backlog_bytes: int = _opt(64 << 20, parse_size, minimum=1 << 20)
    # IM handshakes per address: each costs the node an RSA decryption.
    hellos: float = _opt(20.0, parse_rate, minimum=0)
    hellos_burst: int = _opt(200, parse_int, minimum=1)
    # Router logins per address: each costs a password hash.
    logins: float = _opt(10.0, parse_rate, minimum=0)
    logins_burst: int = _opt(100, parse_int, minimum=1)
    # SOS alarms per device, posts (集赞) per author.
    sos: float = _opt(1 / 60, parse_rate, minimum=0)
    sos_burst: int = _opt(5, parse_int, minimum=1)
    posts: float = _opt(1 / 60, parse_rate, minimum=0)
    posts_burst: int = _opt(10, parse_int, minimum=1)
    # Calls of the logic and file services' APIs per user.
    logic: float = _opt(20.0, parse_rate, minimum=0)
    logic_burst: int = _opt(100, parse_int, minimum=1)
    files: float = _opt(20.0, parse_rate, minimum=0)
    files_burst: int = _opt(100, parse_int, minimum=1)
    # Users or addresses each limit remembers at most (idle ones are forgotten).
    max_keys: int = _opt(100_000, parse_int, minimum=100)
    # How often a node reads the per-user limits set with cimctl limits.
    override_refresh: float = _opt(10.0, parse_duration, minimum=1, maximum=3600)

    def validate(self) -> None:
        pass
