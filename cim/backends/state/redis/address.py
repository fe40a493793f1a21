"""Where Redis is: a parsed redis:// or unix:// URL, and the endpoint to reach it by."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint

from cim.reactor import ICimReactor


@dataclass(frozen=True)
class RedisAddress:
    """A parsed redis:// or unix:// URL; its str and repr never show the password."""

    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"

    def endpoint(self, reactor: ICimReactor, timeout: float) -> IStreamClientEndpoint:
        if self.unix_path is not None:
            return UNIXClientEndpoint(reactor, self.unix_path, timeout=timeout)
        # IP literals skip name resolution (which would need the reactor's resolver).
        if isIPAddress(self.host):
            return TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        if isIPv6Address(self.host):
            return TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def parse_redis_url(url: str) -> RedisAddress:
    """redis://[[user]:password@]host[:port][/db] or unix:///path[?db=N]."""
    parts = urlsplit(url)
    try:
        if parts.scheme == "unix":
            path = parts.netloc + parts.path
            if not path:
                raise ValueError("a unix:// URL needs a socket path")
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            return RedisAddress(
                unix_path=path,
                db=db,
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
            )
        if parts.scheme != "redis":
            raise ValueError("expected redis:// or unix://")
        db_text = parts.path.lstrip("/")
        return RedisAddress(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(db_text) if db_text else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )
    except ValueError as exc:
        # The URL may hold a password: name the problem, never echo the URL.
        raise ValueError(f"not a usable Redis URL: {exc}") from None
