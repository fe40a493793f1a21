"""How many HTTP connections a node holds: per address, per service, and never its last fds.

A process has a fixed number of file descriptors (20,000 here), shared by the HTTP
services, the IM port, the database and the log files. Left alone, anyone who can
open TCP connections to an HTTP port can take them all, and then nobody logs in,
no IM handshake completes and /health cannot answer. So every HTTP listener is
guarded (``HttpConnections.guard``), and a new connection is admitted only if:

1. its address holds fewer than ``[http] max_connections_per_address`` of the
   service's connections (an IPv6 peer is counted by its /64, which one subscriber
   usually has whole); otherwise it is answered ``503`` and closed;
2. the service holds fewer than ``max_connections``; otherwise the service's
   connection that has waited longest for a request (an idle keep-alive or a head
   still trickling in) is closed to make room, and if none is waiting the new one
   is answered ``503``;
3. more than ``fd_reserve`` descriptors are free (the admin service's floor is a
   quarter of that, so /health answers when the other services cannot); otherwise
   the connection of any HTTP service that has waited longest for a request is
   closed to make room, as long as more than half the floor is free (the closed
   one's descriptor comes back only after the current burst of accepts); if none
   is waiting, or half the floor is gone, the new one is closed at once, without an
   answer that would need a descriptor for longer.

A connection reading a request body or being answered is never closed to make
room: the deadlines of ``cim.http.deadlines`` bound how long those take. The IM
port is not guarded here; it uses what HTTP leaves, the reserve included.

Refusals are counted for /health and logged at most once a minute per service.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from cim.config import HttpConfig
from cim.http.deadlines import BoundedChannel, BoundedSite, RequestDeadlines

__all__ = [
    "ConnectionLimits",
    "DescriptorReserve",
    "HttpConnections",
    "ServiceLimits",
    "address_key",
    "count_open_fds",
    "deadlines_from_config",
    "fd_limit",
    "unguarded",
]

RECOUNT_INTERVAL = 1.0
"""Seconds between two counts of the process's open descriptors (a directory listing)."""

REPORT_INTERVAL = 60.0
"""At most one log line per service and this many seconds about refused connections."""

ADMIN_SHARE = 4
"""The admin service stops accepting only when fewer than ``fd_reserve / ADMIN_SHARE``
descriptors are free."""

_FD_DIRECTORIES = ("/proc/self/fd", "/dev/fd")


def count_open_fds() -> int | None:
    """How many descriptors this process has open, or None where that cannot be seen."""
    for directory in _FD_DIRECTORIES:
        try:
            # The listing itself holds one descriptor while it runs.
            return max(0, len(os.listdir(directory)) - 1)
        except OSError:
            continue
    return None


def fd_limit() -> int | None:
    """The process's soft limit on open descriptors; None when it has none."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    return int(soft)


class DescriptorReserve:
    """How many descriptors are free, cheaply enough to ask on every accept.

    The open descriptors are counted at most once per ``recount_interval``; in
    between, the HTTP connections admitted and closed keep the figure current (the
    ones HTTP itself makes in a burst are the ones that matter).
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int | None,
        count: Callable[[], int | None] = count_open_fds,
        recount_interval: float = RECOUNT_INTERVAL,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self._count = count
        self._interval = recount_interval
        self._counted_at = float("-inf")
        self._counted = 0
        self._since = 0

    def free(self) -> int:
        if self.limit is None:
            return sys.maxsize
        now = self._clock.seconds()
        if now - self._counted_at >= self._interval:
            counted = self._count()
            self._counted_at = now
            if counted is not None:
                self._counted, self._since = counted, 0
        return self.limit - (self._counted + self._since)

    def took(self) -> None:
        self._since += 1

    def gave_back(self) -> None:
        self._since -= 1


@dataclass(frozen=True)
class ServiceLimits:
    per_address: int
    total: int
    fd_floor: int
    """The service takes no descriptor while this many or fewer are free."""


def deadlines_from_config(config: HttpConfig) -> RequestDeadlines:
    return RequestDeadlines(
        header_timeout=config.header_timeout,
        body_timeout=config.body_timeout,
        min_body_rate=float(config.min_body_rate),
        idle_timeout=config.idle_timeout,
        send_timeout=config.send_timeout,
    )


def address_key(address: IAddress) -> str:
    """What connections are counted by: the host, an IPv6 peer's /64, or "unix"."""
    if isinstance(address, UNIXAddress):
        return "unix"
    if not isinstance(address, IPv4Address | IPv6Address):
        return str(address)
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return address.host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Admitted:
    """One admitted connection, as its channel's ``ConnectionWatch``."""

    def __init__(self, limits: ConnectionLimits, key: str, channel: BoundedChannel) -> None:
        self.limits = limits
        self.key = key
        self.channel = channel
        self.released = False

    def waiting(self) -> None:
        if not self.released:
            self.limits.mark_waiting(self)

    def busy(self) -> None:
        self.limits.mark_busy(self)

    def cut(self, reason: str) -> None:
        self.limits.cut[reason] += 1

    def closed(self) -> None:
        self.limits.release(self)
        self.limits.connections.reserve.gave_back()


class _Unavailable(Protocol):
    """Answers 503 to a connection over a limit, and closes it."""

    def __init__(self, message: str, reserve: DescriptorReserve) -> None:
        self.message = message
        self.reserve = reserve
        reserve.took()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reserve.gave_back()

    def connectionMade(self) -> None:
        body = json.dumps({"error": "too_many_connections", "message": self.message}).encode()
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        self.transport.loseConnection()


class ConnectionLimits(ServerFactory):
    """One HTTP service's listener factory: admits connections to ``site``; see the module."""

    _log = Logger()

    def __init__(
        self,
        service: str,
        site: BoundedSite,
        limits: ServiceLimits,
        connections: HttpConnections,
    ) -> None:
        self.service = service
        self.site = site
        self.limits = limits
        self.connections = connections
        self.open = 0
        self.by_address: Counter[str] = Counter()
        self.waiting: OrderedDict[_Admitted, None] = OrderedDict()
        self.refused: Counter[str] = Counter()
        self.cut: Counter[str] = Counter()
        self._unreported: Counter[str] = Counter()
        self._reported_at = float("-inf")

    # --- the factory, wrapping the site's -------------------------------------------------

    def doStart(self) -> None:
        self.site.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.site.doStop()
        super().doStop()

    def logPrefix(self) -> str:
        return f"{self.service} (HTTP)"

    def buildProtocol(self, addr: IAddress | None) -> Any:
        key = "unknown" if addr is None else address_key(addr)
        if self.by_address[key] >= self.limits.per_address:
            return self._refuse(
                "per_address", f"{self.limits.per_address} connections from your address"
            )
        if self.open >= self.limits.total and not self.connections.evict_oldest(self.waiting):
            return self._refuse("total", f"{self.limits.total} connections to this service")
        if not self.connections.have_fd_for(self):
            self._count_refusal("fds")
            return None
        channel = self.site.buildProtocol(addr)
        assert isinstance(channel, BoundedChannel)
        admitted = _Admitted(self, key, channel)
        channel.watch = admitted
        self.open += 1
        self.by_address[key] += 1
        self.connections.reserve.took()
        return channel

    def _refuse(self, reason: str, limit: str) -> Protocol | None:
        self._count_refusal(reason)
        if not self.connections.have_fd_for(self, evict=False):
            return None
        return _Unavailable(
            f"the server allows {limit}; try again shortly", self.connections.reserve
        )

    def _count_refusal(self, reason: str) -> None:
        self.refused[reason] += 1
        self._unreported[reason] += 1
        now = self.connections.clock.seconds()
        if now - self._reported_at < REPORT_INTERVAL:
            return
        self._reported_at = now
        counts = ", ".join(f"{n} {why}" for why, n in sorted(self._unreported.items()))
        self._unreported.clear()
        self._log.warn(
            "{service}: refusing HTTP connections ({counts}); limits: {per_address} per "
            "address, {total} in all, {floor} descriptors kept free ({free} free now)",
            service=self.service,
            counts=counts,
            per_address=self.limits.per_address,
            total=self.limits.total,
            floor=self.limits.fd_floor,
            free=self.connections.reserve.free(),
        )

    # --- the admitted connections ------------------------------------------------------

    def mark_waiting(self, admitted: _Admitted) -> None:
        self.waiting.pop(admitted, None)
        self.waiting[admitted] = None
        self.connections.mark_waiting(admitted)

    def mark_busy(self, admitted: _Admitted) -> None:
        self.waiting.pop(admitted, None)
        self.connections.mark_busy(admitted)

    def release(self, admitted: _Admitted) -> None:
        """The connection no longer counts against the limits (closed, or being closed
        to make room); its descriptor is given back once it is actually closed."""
        if admitted.released:
            return
        admitted.released = True
        self.mark_busy(admitted)
        self.open -= 1
        self.by_address[admitted.key] -= 1
        if self.by_address[admitted.key] <= 0:
            del self.by_address[admitted.key]

    def snapshot(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "waiting": len(self.waiting),
            "addresses": len(self.by_address),
            "refused": dict(sorted(self.refused.items())),
            "cut": dict(sorted(self.cut.items())),
        }


def unguarded(site: server.Site) -> IProtocolFactory:
    """A listener's factory without limits (a service run on its own, in tests)."""
    return site


class HttpConnections:
    """Every HTTP connection of the process: the descriptor reserve, who waits longest.

    One per process (the daemon makes it from ``[http]``); each HTTP listener gets
    its factory from ``guard``.
    """

    _log = Logger()

    def __init__(
        self,
        config: HttpConfig,
        clock: IReactorTime,
        reserve: DescriptorReserve | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.reserve = reserve if reserve is not None else DescriptorReserve(clock, fd_limit())
        self.deadlines = deadlines_from_config(config)
        self.fd_reserve = config.fd_reserve
        limit = self.reserve.limit
        if limit is not None and self.fd_reserve > limit // 4:
            # A small limit (a developer's 1024) must still leave HTTP most of it.
            self.fd_reserve = max(1, limit // 4)
            self._log.warn(
                "[http] fd_reserve = {wanted} is more than a quarter of the process's "
                "limit of {limit} open files; keeping {kept} free instead (raise the "
                "limit: ulimit -n, or LimitNOFILE= under systemd)",
                wanted=config.fd_reserve,
                limit=limit,
                kept=self.fd_reserve,
            )
        self.services: dict[str, ConnectionLimits] = {}
        self.waiting: OrderedDict[_Admitted, None] = OrderedDict()
        self.evicted = 0

    def guard(self, service: str, site: server.Site) -> ConnectionLimits:
        """The factory to listen with for ``service``: ``site`` behind the limits."""
        if not isinstance(site, BoundedSite):
            raise TypeError(f"{service}: only a BoundedSite (cim.http.site) can be guarded")
        config = self.config
        if service == "admin":
            total = config.admin_max_connections
            limits = ServiceLimits(total, total, max(1, self.fd_reserve // ADMIN_SHARE))
        else:
            limits = ServiceLimits(
                config.max_connections_per_address, config.max_connections, self.fd_reserve
            )
        site.apply(self.deadlines)
        guarded = self.services[service] = ConnectionLimits(service, site, limits, self)
        return guarded

    def have_fd_for(self, limits: ConnectionLimits, evict: bool = True) -> bool:
        """Whether a connection to ``limits``'s service may take a descriptor.

        At or under the service's floor, the longest-waiting connection of any service
        is closed to make room for the new one, while more than half the floor is
        free: the closed connection's descriptor comes back only once the reactor has
        closed its socket, after the burst of accepts this one may be part of, so a
        burst digs into the reserve, but only half-way; past that, new connections
        are closed at once (and nobody else is) until descriptors come back.
        """
        free, floor = self.reserve.free(), limits.limits.fd_floor
        if free > floor:
            return True
        if not evict or free <= floor // 2:
            return False
        return self.evict_oldest(self.waiting)

    def evict_oldest(self, waiting: OrderedDict[_Admitted, None]) -> bool:
        """Close the connection that has waited longest in ``waiting``, if there is one."""
        if not waiting:
            return False
        admitted = next(iter(waiting))
        admitted.limits.release(admitted)
        self.evicted += 1
        admitted.channel.evict()
        return True

    def mark_waiting(self, admitted: _Admitted) -> None:
        self.waiting.pop(admitted, None)
        self.waiting[admitted] = None

    def mark_busy(self, admitted: _Admitted) -> None:
        self.waiting.pop(admitted, None)

    def snapshot(self) -> dict[str, Any]:
        """For /health: descriptors, and each service's connections and refusals."""
        return {
            "fd_limit": self.reserve.limit,
            "fds_free": self.reserve.free() if self.reserve.limit is not None else None,
            "fd_reserve": self.fd_reserve,
            "evicted": self.evicted,
            "services": {name: limits.snapshot() for name, limits in self.services.items()},
        }
