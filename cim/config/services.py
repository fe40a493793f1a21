"""The sections of the services: node, router, accounts, im, ws, logic, files, admin, web, http."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from cim.config.values import (
    KNOWN_SUITES,
    REQUIRED,
    SUITE_CHACHA,
    SUITE_RC4,
    ConfigError,
    _opt,
    parse_bool,
    parse_duration,
    parse_endpoint,
    parse_float,
    parse_host_port,
    parse_int,
    parse_list,
    parse_size,
    parse_str,
)


def parse_ws_url(raw: str) -> str:
    """A ws:// or wss:// URL clients are handed, or empty for "derive it from listen"."""
    url = raw.strip()
    if not url:
        return ""
    if not re.fullmatch(r"wss?://[^\s/?#]+(/[^\s#]*)?", url):
        raise ValueError("expected a WebSocket URL such as wss://chat.example.com/ws")
    return url


def parse_origins(raw: str) -> tuple[str, ...]:
    """Web origins (scheme://host[:port], lower case, no path), or * for any origin.

    An origin is compared as the browser sends it, so a trailing slash or a path is a
    mistake that would silently refuse every page: it is refused here instead.
    """
    origins = tuple(origin.lower() for origin in parse_list(raw))
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^\s/?#*]+", origin):
            raise ValueError(
                f"{origin!r} is not an origin: expected scheme://host[:port] "
                "(no path, no trailing slash) or *"
            )
    return origins


@dataclass(frozen=True)
class NodeConfig:
    section: ClassVar[str] = "node"
    id: str = _opt(REQUIRED, parse_str)
    data_dir: str = _opt("data", parse_str)
    # The operation log (cim.oplog): empty means <data_dir>/operations.log, "off" none.
    operation_log: str = _opt("", parse_str)
    # How often freed heap memory is handed back to the system (cim.heap); 0: never.
    heap_trim_interval: float = _opt(5.0, parse_duration, minimum=0)
    # How often the reactor lag probe runs (cim.metrics.ReactorLag); 0: never.
    lag_probe_interval: float = _opt(0.0, parse_duration, minimum=0, maximum=1)
    # SIGTERM: the stop waits this long for clients to go and queued work to finish,
    # then the process exits anyway (systemd's TimeoutStopSec is 60 s).
    stop_timeout: float = _opt(45.0, parse_duration, minimum=1, maximum=3600)

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
    # Web pages (origins) whose scripts may call this API from another origin (CORS).
    cors_origins: tuple[str, ...] = _opt((), parse_origins)

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
    # The heartbeat of a device whose app says it is in the background (APP_STATE_R):
    # phones save battery and radio; the node waits as many of these intervals.
    background_heartbeat_interval: float = _opt(270.0, parse_duration, minimum=1, maximum=3600)
    max_connections_per_address: int = _opt(1000, parse_int, minimum=1)
    cipher_suites: tuple[str, ...] = _opt((SUITE_CHACHA, SUITE_RC4), parse_list)
    rsa_key: str = _opt("", parse_str)
    rsa_key_bits: int = _opt(2048, parse_int, minimum=2048, maximum=8192)
    handshake_replay_window: float = _opt(300.0, parse_duration, minimum=10)
    # A reconnect within this long of a login resumes with the ticket its LoginResult
    # carried: no RSA, no router (docs/crypto.md, "Resumption"). 0 turns it off.
    resume_window: float = _opt(600.0, parse_duration, minimum=0, maximum=86400)
    # Frames a connection may send with a number out of range (ids past 2^63-1, unknown
    # enum values): each is answered BAD_REQUEST; this many close the connection.
    max_bad_frames: int = _opt(100, parse_int, minimum=1, maximum=1_000_000)
    # Characters of a message's text; longer ones are refused (BAD_REQUEST).
    max_text_length: int = _opt(16384, parse_int, minimum=1, maximum=16 << 20)
    # Who may send 1:1 messages to a person who never chose (docs/privacy.md):
    # "everyone", or "contacts" (recommended for family products). A device account
    # always takes messages only from its guardians and the contacts they approved.
    default_message_policy: str = _opt("everyone", parse_str, choices=("everyone", "contacts"))
    # Who may add a person who never chose to a group without an invitation:
    # "contacts" (their contacts; everyone else invites), or "nobody" (all invite).
    default_group_adds: str = _opt("contacts", parse_str, choices=("contacts", "nobody"))
    # Bytes a connection may have queued (unread by its client) before it gets no more
    # live copies (kept for its next pull); over it this long, it is cut.
    outbound_budget: int = _opt(1 << 20, parse_size, minimum=4096, maximum=1 << 30)
    slow_reader_timeout: float = _opt(30.0, parse_duration, minimum=0.1)
    # Bytes queued for all connections before the node stops reading from the
    # heaviest senders (until the queued bytes fall below half of it).
    max_queued_bytes: int = _opt(256 << 20, parse_size, minimum=64 << 10)
    # Messages waiting for the offline store, or transactions for the database,
    # before the node stops reading from the heaviest senders (until half of it).
    max_pending_work: int = _opt(50, parse_int, minimum=1)
    # How long after sending its sender may recall a message (a group's owner or admin
    # may recall any message of the group at any time), and edit a text (#15).
    recall_window: float = _opt(120.0, parse_duration, minimum=0, maximum=86400 * 365)
    edit_window: float = _opt(900.0, parse_duration, minimum=0, maximum=86400 * 365)
    # Devices of one user online at once (phone, tablet, web, ...); a login past it
    # follows [router] duplicate_login: kick_old ends the device idle longest,
    # refuse_new refuses the login. The same device logging in again replaces itself.
    max_devices_per_user: int = _opt(5, parse_int, minimum=1, maximum=100)

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
        if self.background_heartbeat_interval < self.heartbeat_interval:
            raise ConfigError(
                "im",
                "background_heartbeat_interval",
                str(self.background_heartbeat_interval),
                f"must be at least heartbeat_interval ({self.heartbeat_interval:g} s)",
            )

    # Cached: every connection keeps the timeout it was given (its ``timeOut``), and a
    # float made per call would be one more object per idle connection (issue #20).
    @cached_property
    def effective_heartbeat_timeout(self) -> float:
        """Three silent intervals unless configured."""
        return self.heartbeat_timeout or 3 * self.heartbeat_interval

    @cached_property
    def background_heartbeat_timeout(self) -> float:
        """The foreground's ratio of timeout to interval (3 unless heartbeat_timeout
        says otherwise) applied to the background interval: as many heartbeats may be
        missed in the background as in the foreground (default 810 s)."""
        ratio = self.effective_heartbeat_timeout / self.heartbeat_interval
        return ratio * self.background_heartbeat_interval


@dataclass(frozen=True)
class WsConfig:
    """The WebSocket gateway: the IM connection protocol for browsers (cim.protocols.gateway).

    Frame size, handshake deadline, heartbeats and connections per address are the
    ``[im]`` ones: a WebSocket connection is an IM connection on another transport.
    """

    section: ClassVar[str] = "ws"
    enabled: bool = _opt(False, parse_bool)
    listen: str = _opt("tcp:9001:interface=127.0.0.1", parse_endpoint)
    # The URL the router hands out; empty: ws://<listen interface>:<port>/ (wss with ssl:).
    advertise: str = _opt("", parse_ws_url)
    # Origins (web pages) allowed to open a connection; clients that send no Origin
    # (not browsers) are not bound by it. "*" allows every page.
    allowed_origins: tuple[str, ...] = _opt((), parse_origins)
    # WebSocket pings and cim heartbeats a connection may send per second; more closes it.
    max_pings_per_second: int = _opt(5, parse_int, minimum=1, maximum=10000)

    def validate(self) -> None:
        pass


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
    # Web pages (origins) whose scripts may call this API from another origin (CORS).
    cors_origins: tuple[str, ...] = _opt((), parse_origins)

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
    # Web pages (origins) whose scripts may upload and download from another origin.
    cors_origins: tuple[str, ...] = _opt((), parse_origins)

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
class WebConfig:
    """The web chat app (``web/``, built into ``cim/webapp/static``) served as files."""

    section: ClassVar[str] = "web"
    enabled: bool = _opt(False, parse_bool)
    listen: str = _opt("tcp:8083:interface=127.0.0.1", parse_endpoint)
    # The built app's directory; empty means the one shipped in the package
    # (``make web`` builds it there).
    root: str = _opt("", parse_str)
    # Where the app may connect (the CSP's connect-src): the router, logic, files and
    # WebSocket addresses it is given. The default allows any http(s)/ws(s) address.
    connect_src: str = _opt("'self' http: https: ws: wss:", parse_str)

    def validate(self) -> None:
        if any(c in self.connect_src for c in ";,\r\n"):
            raise ConfigError(
                "web", "connect_src", self.connect_src, "space-separated CSP sources only"
            )


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
