"""Typed configuration: one class per INI section, validated before anything starts.

Every error names the section, the key and the offending value in one line, so an
operator can fix ``etc/cim.ini`` without reading a traceback. ``cimctl check-config``
and the daemon run exactly the same validation.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

SUITE_CHACHA = "chacha20-poly1305"
SUITE_RC4 = "rc4-hmac-sha256"
KNOWN_SUITES = (SUITE_CHACHA, SUITE_RC4)


class ConfigError(Exception):
    """A configuration problem, rendered as one line naming where it is."""

    def __init__(self, section: str, key: str | None, value: str | None, reason: str) -> None:
        super().__init__(section, key, value, reason)
        self.section = section
        self.key = key
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        if not self.section:
            return f"config error: {self.reason}"
        where = f"[{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
            if self.value is not None:
                where += f" = {self.value!r}"
        return f"config error: {where}: {self.reason}"


# --- value parsers -------------------------------------------------------------------
# Each takes the raw string and returns the typed value or raises ValueError whose text
# says what was expected; the loader turns that into a ConfigError with the path.


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def parse_int(raw: str) -> int:
    try:
        return int(raw.strip().replace("_", ""))
    except ValueError:
        raise ValueError("expected a whole number") from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(raw: str) -> float:
    """Seconds; a bare number is seconds, or a suffix ms, s, m, h, d."""
    match = _DURATION.match(raw)
    if match is None:
        raise ValueError("expected a duration such as 30, 30s, 5m, 2h or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kib|m|mib|g|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20}
_SIZE_UNITS.update({"g": 1 << 30, "gib": 1 << 30})


def parse_size(raw: str) -> int:
    """Bytes; a bare number is bytes, or a suffix KiB, MiB, GiB."""
    match = _SIZE.match(raw)
    if match is None:
        raise ValueError("expected a size such as 65536, 64KiB or 1MiB")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_rate(raw: str) -> float:
    """Per second; ``20/s``, ``30/m``, ``10/h`` (a bare number is per second), or
    ``off`` (also 0): no limit."""
    if raw.strip().lower() == "off":
        return 0.0
    match = _RATE.match(raw)
    if match is None:
        raise ValueError("expected a rate such as 20/s, 30/m or 10/h, or off")
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


def parse_str(raw: str) -> str:
    return raw.strip()


def parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_endpoint(raw: str) -> str:
    """A Twisted server endpoint description, checked without listening."""
    description = raw.strip()
    try:
        endpoint = serverFromString(MemoryReactor(), description)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a valid endpoint description ({exc})") from None
    port = getattr(endpoint, "_port", None)
    if port is not None and not 0 <= int(port) <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return description


def parse_host_port(raw: str) -> str:
    """host:port, or empty for "derive it"."""
    if not raw.strip():
        return ""
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port")
    try:
        number = int(port)
    except ValueError:
        raise ValueError("expected host:port with a numeric port") from None
    if not 1 <= number <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return raw.strip()


REQUIRED: Any = object()
"""Default of a key the operator must set."""


def _opt(
    default: Any,
    parse: Callable[[str], Any],
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    doc: str = "",
) -> Any:
    return field(
        default=default,
        metadata={"parse": parse, "min": minimum, "max": maximum, "choices": choices, "doc": doc},
    )


# --- sections ------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeConfig:
    section: ClassVar[str] = "node"
    id: str = _opt(REQUIRED, parse_str)
    data_dir: str = _opt("data", parse_str)
    # The operation log (cim.oplog): empty means <data_dir>/operations.log, "off" none.
    operation_log: str = _opt("", parse_str)
    # How often freed heap memory is handed back to the system (cim.heap); 0: never.
    heap_trim_interval: float = _opt(5.0, parse_duration, minimum=0)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.id):
            raise ConfigError("node", "id", self.id, "use 1-64 letters, digits, '.', '_' or '-'")


@dataclass(frozen=True)
class RouterConfig:
    section: ClassVar[str] = "router"
    enabled: bool = _opt(True, parse_bool)
    listen: str = _opt("tcp:8080:interface=127.0.0.1", parse_endpoint)
    duplicate_login: str = _opt("kick_old", parse_str, choices=("kick_old", "refuse_new"))
    token_ttl: float = _opt(7 * 86400.0, parse_duration, minimum=60)
    max_failed_logins_per_user: int = _opt(5, parse_int, minimum=1)
    max_failed_logins_per_address: int = _opt(20, parse_int, minimum=1)
    failed_login_window: float = _opt(300.0, parse_duration, minimum=1)
    max_body_size: int = _opt(16384, parse_size, minimum=256)
    virtual_nodes: int = _opt(160, parse_int, minimum=1, maximum=4096)

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class AccountsConfig:
    section: ClassVar[str] = "accounts"
    scrypt_n: int = _opt(16384, parse_int, minimum=1024, maximum=1 << 20)
    scrypt_r: int = _opt(8, parse_int, minimum=1, maximum=32)
    scrypt_p: int = _opt(1, parse_int, minimum=1, maximum=16)
    min_password_length: int = _opt(8, parse_int, minimum=1, maximum=1024)
    # Names nobody may register, beyond the built-in system, admin, root and every
    # name starting with '@' (compared without regard to case).
    reserved_names: tuple[str, ...] = _opt((), parse_list)

    def validate(self) -> None:
        for name in self.reserved_names:
            if not re.fullmatch(r"@?[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                raise ConfigError(
                    "accounts",
                    "reserved_names",
                    ", ".join(self.reserved_names),
                    f"{name!r} is not a user name (1-64 letters, digits, '.', '_' or '-')",
                )
        if self.scrypt_n & (self.scrypt_n - 1):
            raise ConfigError("accounts", "scrypt_n", str(self.scrypt_n), "must be a power of 2")
        memory = 128 * self.scrypt_r * (self.scrypt_n + self.scrypt_p + 2)
        if memory > (1 << 31) - 1:
            raise ConfigError(
                "accounts",
                "scrypt_n",
                str(self.scrypt_n),
                f"with scrypt_r = {self.scrypt_r} each check would need {memory >> 20} MiB; "
                "scrypt allows at most 2 GiB",
            )


@dataclass(frozen=True)
class ImConfig:
    section: ClassVar[str] = "im"
    enabled: bool = _opt(True, parse_bool)
    listen: str = _opt("tcp:9000:interface=127.0.0.1", parse_endpoint)
    advertise: str = _opt("", parse_host_port)
    max_frame_size: int = _opt(65536, parse_size, minimum=1024, maximum=16 << 20)
    handshake_timeout: float = _opt(10.0, parse_duration, minimum=0.1)
    heartbeat_interval: float = _opt(30.0, parse_duration, minimum=1)
    heartbeat_timeout: float = _opt(0.0, parse_duration, minimum=0)
    max_connections_per_address: int = _opt(1000, parse_int, minimum=1)
    cipher_suites: tuple[str, ...] = _opt((SUITE_CHACHA, SUITE_RC4), parse_list)
    rsa_key: str = _opt("", parse_str)
    rsa_key_bits: int = _opt(2048, parse_int, minimum=2048, maximum=8192)
    handshake_replay_window: float = _opt(300.0, parse_duration, minimum=10)
    # Characters of a message's text; longer ones are refused (BAD_REQUEST).
    max_text_length: int = _opt(16384, parse_int, minimum=1, maximum=16 << 20)
    # Who may send 1:1 messages to a person who never chose (docs/privacy.md):
    # "everyone", or "contacts" (recommended for family products). A device account
    # always takes messages only from its guardians and the contacts they approved.
    default_message_policy: str = _opt("everyone", parse_str, choices=("everyone", "contacts"))
    # Who may add a person who never chose to a group without an invitation:
    # "contacts" (their contacts; everyone else invites), or "nobody" (all invite).
    default_group_adds: str = _opt("contacts", parse_str, choices=("contacts", "nobody"))

    def validate(self) -> None:
        if not self.cipher_suites:
            raise ConfigError("im", "cipher_suites", "", "name at least one cipher suite")
        for suite in self.cipher_suites:
            if suite not in KNOWN_SUITES:
                raise ConfigError(
                    "im",
                    "cipher_suites",
                    ",".join(self.cipher_suites),
                    f"unknown suite {suite!r}; known: {', '.join(KNOWN_SUITES)}",
                )
        if self.heartbeat_timeout and self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                "im",
                "heartbeat_timeout",
                str(self.heartbeat_timeout),
                f"must be longer than heartbeat_interval ({self.heartbeat_interval:g} s)",
            )

    @property
    def effective_heartbeat_timeout(self) -> float:
        """Three silent intervals unless configured."""
        return self.heartbeat_timeout or 3 * self.heartbeat_interval


@dataclass(frozen=True)
class LogicConfig:
    """The logic service (cim.logic): accounts, device binding, SOS, geofences, likes."""

    section: ClassVar[str] = "logic"
    enabled: bool = _opt(False, parse_bool)
    listen: str = _opt("tcp:8081:interface=127.0.0.1", parse_endpoint)
    max_body_size: int = _opt(256 << 10, parse_size, minimum=1024, maximum=16 << 20)
    # Off: accounts come from cimctl (or an operator's own tooling) only.
    open_registration: bool = _opt(True, parse_bool)
    # Names registered over HTTP must also match this (cimctl is not bound by it).
    name_pattern: str = _opt(r"[a-z0-9][a-z0-9_.-]{2,31}", parse_str)
    # How many of lower case, upper case, digits and other characters a new password
    # must mix; the length rule is [accounts] min_password_length.
    password_classes: int = _opt(2, parse_int, minimum=1, maximum=4)
    # Each registration runs the password KDF: at most this many per address and window.
    registrations_per_address: int = _opt(20, parse_int, minimum=1)
    registration_window: float = _opt(3600.0, parse_duration, minimum=1)
    binding_code_ttl: float = _opt(600.0, parse_duration, minimum=30, maximum=86400)
    binding_code_digits: int = _opt(6, parse_int, minimum=6, maximum=12)
    # Wrong codes a person may try per window before further tries are refused.
    binding_attempts: int = _opt(5, parse_int, minimum=1, maximum=1000)
    binding_attempt_window: float = _opt(900.0, parse_duration, minimum=10)
    # Geofences: a position must be this far past the boundary, and that many
    # consecutive reports must agree, before entering or leaving is announced.
    fence_margin: float = _opt(15.0, parse_float, minimum=0, maximum=10000)
    fence_confirmations: int = _opt(2, parse_int, minimum=1, maximum=50)
    max_fences_per_device: int = _opt(50, parse_int, minimum=1, maximum=10000)
    max_fence_points: int = _opt(200, parse_int, minimum=3, maximum=10000)
    max_positions_per_report: int = _opt(500, parse_int, minimum=1, maximum=100000)
    location_retention: float = _opt(30 * 86400.0, parse_duration, minimum=3600)
    purge_interval: float = _opt(3600.0, parse_duration, minimum=10)

    def validate(self) -> None:
        try:
            re.compile(self.name_pattern)
        except re.error as exc:
            raise ConfigError(
                "logic", "name_pattern", self.name_pattern, f"not a regular expression: {exc}"
            ) from None


def parse_base_url(raw: str) -> str:
    """An http(s) base URL without a trailing slash, or empty for "derive it"."""
    url = raw.strip().rstrip("/")
    if not url:
        return ""
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ValueError("expected a base URL such as https://files.example.com")
    return url


@dataclass(frozen=True)
class FilesConfig:
    section: ClassVar[str] = "files"
    enabled: bool = _opt(False, parse_bool)
    listen: str = _opt("tcp:8082:interface=127.0.0.1", parse_endpoint)
    public_url: str = _opt("", parse_base_url)
    storage_dir: str = _opt("", parse_str)
    url_key: str = _opt("", parse_str)
    # Signed URLs are bound to a user and still take their token: short-lived.
    url_ttl: float = _opt(3600.0, parse_duration, minimum=60)
    max_file_size: int = _opt(1 << 30, parse_size, minimum=1)
    chunk_size: int = _opt(1 << 20, parse_size, minimum=64 << 10, maximum=64 << 20)
    user_quota: int = _opt(10 << 30, parse_size, minimum=0)
    upload_expiry: float = _opt(86400.0, parse_duration, minimum=60)
    # A deleted file's holding counts (toward the quota, and as a reference) this long.
    purge_grace: float = _opt(86400.0, parse_duration, minimum=0)
    thumbnail_size: int = _opt(256, parse_int, minimum=16, maximum=4096)
    max_image_pixels: int = _opt(100_000_000, parse_int, minimum=1024, maximum=1 << 31)
    # Memory all thumbnails being made at once may decode into (estimated from each
    # image's header before decoding); more uploads wait their turn.
    thumbnail_memory: int = _opt(512 << 20, parse_size, minimum=64 << 20, maximum=1 << 40)
    threads: int = _opt(4, parse_int, minimum=1, maximum=64)

    def validate(self) -> None:
        if self.enabled and not self.public_url and not self.listen.startswith(("tcp:", "ssl:")):
            raise ConfigError(
                "files",
                "public_url",
                "",
                f"set it: it cannot be derived from listen = {self.listen!r}",
            )


@dataclass(frozen=True)
class AdminConfig:
    section: ClassVar[str] = "admin"
    enabled: bool = _opt(True, parse_bool)
    listen: str = _opt("tcp:9100:interface=127.0.0.1", parse_endpoint)
    # The operators' tokens (cim.http.operators), one "name:token" line each, made by
    # cimctl keygen --admin; empty means <data_dir>/admin_token.
    token_file: str = _opt("", parse_str)
    # "no": /metrics asks for an admin token like everything else; "loopback": any
    # local peer may scrape it without one.
    metrics_open: str = _opt("no", parse_str, choices=("no", "loopback"))

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class HttpConfig:
    """What every HTTP service (router, files, logic, admin) allows one connection.

    Slow requests are cut by deadlines rather than idle timers (a byte every few
    seconds keeps an idle timer happy forever); connections are counted per address
    and per service; and HTTP stops taking file descriptors while fewer than
    ``fd_reserve`` are free, so the IM port and /health keep working.
    """

    section: ClassVar[str] = "http"
    header_timeout: float = _opt(10.0, parse_duration, minimum=0.5, maximum=600)
    body_timeout: float = _opt(30.0, parse_duration, minimum=1, maximum=3600)
    min_body_rate: int = _opt(1024, parse_size, minimum=0, maximum=1 << 30)
    idle_timeout: float = _opt(60.0, parse_duration, minimum=1, maximum=86400)
    send_timeout: float = _opt(60.0, parse_duration, minimum=1, maximum=86400)
    max_connections_per_address: int = _opt(128, parse_int, minimum=1, maximum=1_000_000)
    max_connections: int = _opt(4096, parse_int, minimum=1, maximum=1_000_000)
    admin_max_connections: int = _opt(64, parse_int, minimum=1, maximum=100_000)
    fd_reserve: int = _opt(1024, parse_int, minimum=16, maximum=1_000_000)

    def validate(self) -> None:
        if self.max_connections_per_address > self.max_connections:
            raise ConfigError(
                "http",
                "max_connections_per_address",
                str(self.max_connections_per_address),
                f"must not exceed max_connections ({self.max_connections})",
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
    batch_wait: float = _opt(0.2, parse_duration, minimum=0.001, maximum=60)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", self.queue):
            raise ConfigError(
                "offline", "queue", self.queue, "expected a RabbitMQ queue name like cim.offline"
            )


@dataclass(frozen=True)
class ArchiveConfig:
    """The history archive (cim.history.archive); its transport follows ``[queue] backend``."""

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


SectionT = TypeVar("SectionT")


@dataclass(frozen=True)
class CimConfig:
    """The whole validated configuration."""

    node: NodeConfig
    router: RouterConfig
    accounts: AccountsConfig
    im: ImConfig
    logic: LogicConfig
    files: FilesConfig
    admin: AdminConfig
    state: StateConfig
    registry: RegistryConfig
    queue: QueueConfig
    database: DatabaseConfig
    offline: OfflineConfig
    archive: ArchiveConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    path: str = ""

    @property
    def database_url(self) -> str:
        return self.database.url or "sqlite:///" + os.path.join(self.node.data_dir, "cim.db")

    @property
    def rsa_key_path(self) -> str:
        return self.im.rsa_key or os.path.join(self.node.data_dir, "node_key.pem")

    @property
    def operation_log_path(self) -> str | None:
        """Where the operation log goes; None when ``[node] operation_log = off``."""
        value = self.node.operation_log
        if value.lower() in ("off", "none", "false", "no"):
            return None
        return value or os.path.join(self.node.data_dir, "operations.log")

    @property
    def admin_token_path(self) -> str:
        return self.admin.token_file or os.path.join(self.node.data_dir, "admin_token")

    @property
    def retention_days(self) -> float | None:
        """For HistoryStore: None keeps the history for ever (``retention_days = 0``)."""
        return float(self.archive.retention_days) or None


SECTIONS: tuple[type, ...] = (
    NodeConfig,
    RouterConfig,
    AccountsConfig,
    ImConfig,
    LogicConfig,
    FilesConfig,
    AdminConfig,
    StateConfig,
    RegistryConfig,
    QueueConfig,
    DatabaseConfig,
    OfflineConfig,
    ArchiveConfig,
    LimitsConfig,
    LogConfig,
    HttpConfig,
)


def _parse_section(cls: type[SectionT], values: Mapping[str, str]) -> SectionT:
    section: str = cls.section  # type: ignore[attr-defined]
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        spec = known.get(key)
        if spec is None:
            hint = ", ".join(sorted(known))
            raise ConfigError(section, key, raw, f"unknown key (known keys: {hint})")
        meta = spec.metadata
        try:
            value = meta["parse"](raw)
        except ValueError as exc:
            raise ConfigError(section, key, raw, str(exc)) from None
        if meta["choices"] is not None and value not in meta["choices"]:
            raise ConfigError(section, key, raw, f"expected one of: {', '.join(meta['choices'])}")
        if meta["min"] is not None and value < meta["min"]:
            raise ConfigError(section, key, raw, f"must be at least {meta['min']}")
        if meta["max"] is not None and value > meta["max"]:
            raise ConfigError(section, key, raw, f"must be at most {meta['max']}")
        kwargs[key] = value
    for name, spec in known.items():
        if spec.default is REQUIRED and name not in kwargs:
            raise ConfigError(section, name, None, "required key is missing")
    instance = cls(**kwargs)
    try:
        instance.validate()  # type: ignore[attr-defined]
    except ConfigError as error:
        # validate() sees parsed values (1.0 for "1s"): show the operator what they typed.
        if error.key is not None and error.key in values and error.value is not None:
            error.value = _hide_password(values[error.key])
        raise
    return instance


def parse_config(text: str, path: str = "<string>") -> CimConfig:
    """Parse and validate INI text; raise ConfigError naming the first problem."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=("#", ";"), default_section="\0defaults"
    )
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(exc.section, exc.option, None, "key given twice") from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(exc.section, None, None, "section given twice") from None
    except configparser.Error as exc:
        raise ConfigError("", None, None, f"cannot parse {path}: {exc.message}") from None
    by_name = {cls.section: cls for cls in SECTIONS}  # type: ignore[attr-defined]
    for name in parser.sections():
        if name not in by_name:
            raise ConfigError(name, None, None, f"unknown section (known: {', '.join(by_name)})")
    parsed: dict[str, Any] = {
        name: _parse_section(cls, dict(parser[name]) if parser.has_section(name) else {})
        for name, cls in by_name.items()
    }
    config = CimConfig(path=path, **parsed)
    if config.im.enabled and not config.im.advertise:
        _advertise_from_listen(config.im.listen)
    return config


def _advertise_from_listen(listen: str) -> None:
    if not listen.startswith(("tcp:", "ssl:")):
        raise ConfigError(
            "im", "advertise", "", f"set it: it cannot be derived from listen = {listen!r}"
        )


def load_config(path: str) -> CimConfig:
    """Read a config file; a missing or unreadable file is a ConfigError too."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError("", None, None, f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, path)
