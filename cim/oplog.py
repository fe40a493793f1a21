"""The operation log (design: 用户的操作日志): who did what, when, from where.

Logins, logouts, kicks, handshake failures and admin actions are what an operator or
an auditor asks about later ("who logged in as alice yesterday, from which address?"),
so they go to a file of their own, one JSON object per line, instead of being mixed
into the daemon's diagnostic log: ``jq``, a log shipper or ``grep`` reads them
without parsing free text, and their retention can differ from the debug log's.

Each line has ``time`` (UTC, ISO 8601 with milliseconds), ``event``, ``node``,
``user``, ``peer`` (the client's address) and ``detail`` (the rest of the fields).

Tokens, passwords and keys must never reach this file (it is read by more people
than the database is): any field whose name says it holds a secret is replaced by
``"[redacted]"``, at any depth, whatever the caller passed.

Writing never raises: an operation log that cannot be written (a full disk) must not
refuse a login. Lines are written with one ``write`` on a file opened for append, so
lines from several processes sharing the file do not interleave.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

__all__ = [
    "ADMIN",
    "HANDSHAKE_FAILED",
    "KICK",
    "LOGIN",
    "LOGIN_FAILED",
    "LOGOUT",
    "OperationLog",
    "redact",
]

LOGIN = "login"
LOGIN_FAILED = "login_failed"
LOGOUT = "logout"
KICK = "kick"
HANDSHAKE_FAILED = "handshake_failed"
ADMIN = "admin"

REDACTED = "[redacted]"
_SECRET_WORDS = frozenset(
    {
        "auth",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "key",
        "nonce",
        "pass",
        "passphrase",
        "passwd",
        "password",
        "pwd",
        "secret",
        "sig",
        "signature",
        "token",
    }
)
"""A field is secret when any word of its name is one of these (``new_password``,
``tokenHash``, ``rsa-key``), so "design" or "passenger" stay readable."""
_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_EVENT = re.compile(r"[a-z][a-z0-9_.]{0,63}")
FILE_MODE = 0o640
"""Readable by the group that reads the logs, not by every user of the host."""

_log = Logger(namespace="cim.oplog")


def _secret_name(name: str) -> bool:
    return any(word.lower() in _SECRET_WORDS for word in _WORDS.findall(name))


def redact(value: Any) -> Any:
    """value with every secret-named field replaced, for JSON (unknown types as str)."""
    if isinstance(value, Mapping):
        return {
            str(key): REDACTED if _secret_name(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1***@", value)  # amqp://user:password@host
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"  # never the bytes: they may be key material
    return str(value)


def address_text(peer: Any) -> str | None:
    """ "host:port" from a Twisted IAddress, a (host, port) pair or a string."""
    if peer is None or isinstance(peer, str):
        return peer
    if isinstance(peer, tuple) and len(peer) == 2:
        host, port = peer
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is not None and port is not None:
        return address_text((host, port))
    return str(peer)


class OperationLog:
    """Appends operation events to ``path``; with None it is disabled (emit does nothing).

    ``clock`` gives seconds since the epoch (``reactor.seconds`` in the daemon,
    ``time.time`` in cimctl, a test clock in tests). Making one touches no file: the
    file is opened by ``open`` (the daemon's start-up) or by the first event.
    """

    def __init__(self, path: str | None, node: str, clock: Callable[[], float]) -> None:
        self.path = path
        self.node = node
        self._clock = clock
        self._lock = threading.Lock()
        """cimctl and the admin service may emit from threads (a pool's worker)."""
        self._fd: int | None = None
        self._broken = False
        self.written = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def open(self) -> None:
        """Open the file now (creating it), so a problem shows at start-up. Never raises."""
        with self._lock:
            if self.path is not None and self._fd is None:
                self._open()

    def _open(self) -> None:
        assert self.path is not None
        try:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            self._fd = None
            self._report(exc)

    def emit(
        self,
        event: str,
        *,
        user: str | None = None,
        peer: Any = None,
        **detail: Any,
    ) -> None:
        """Write one event. ``peer`` may be an IAddress, (host, port) or a string; every
        other keyword lands in ``detail`` (secrets redacted). Never raises."""
        if self.path is None:
            return
        try:
            line = self._line(event, user, peer, detail)
        except Exception:
            self.failed += 1
            _log.failure("oplog: could not format a {event!r} event", event=event)
            return
        with self._lock:
            if self._fd is None:
                self._open()
            if self._fd is None:
                self.failed += 1
                return
            try:
                os.write(self._fd, line)
            except OSError as exc:
                self.failed += 1
                self._report(exc)
                return
            self.written += 1
            if self._broken:
                self._broken = False
                _log.info("oplog: writing to {path} works again", path=self.path)

    def _line(self, event: str, user: str | None, peer: Any, detail: Mapping[str, Any]) -> bytes:
        if not _EVENT.fullmatch(event):
            raise ValueError(f"not an event name: {event!r}")
        moment = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        record: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
            "node": self.node,
            "user": user,
            "peer": address_text(peer),
            "detail": redact(dict(detail)),
        }
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        return (text + "\n").encode("utf-8", "replace")

    def _report(self, exc: OSError) -> None:
        if not self._broken:
            self._broken = True
            _log.error(
                "oplog: cannot write the operation log {path}: {why}; events are lost until it can",
                path=self.path,
                why=exc.strerror or str(exc),
            )

    def reopen(self) -> None:
        """Close and open the file again, for log rotation (call on SIGHUP)."""
        with self._lock:
            self._close()
            if self.path is not None:
                self._open()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
