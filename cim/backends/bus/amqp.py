"""Where RabbitMQ is, and one AMQP connection as the reconnecting link sees it.

pika's Twisted adapter is wrapped rather than used as it comes (the rest of the list
is in ``cim.backends.bus.amqp_link``):

- a connection the broker refuses or closes loses the broker's reason (wrong password,
  unknown vhost, shutdown), replaced by "closed cleanly" or a bare count of attempts:
  here the reason is kept, for the log and for ``start``;
- it ends a connection with loseConnection, which waits for unsent data to drain, so
  a hung broker could hold a dead connection open forever: here it is cut after
  ``CLOSE_TIMEOUT``; and it takes the broker's heartbeat (60 s) unless told: here
  ``DEFAULT_HEARTBEAT``, so a silent broker is left within half a minute;
- it logs through the stdlib at ERROR on every connection loss, duplicating (per
  attempt) what the link reports once: its logger is quieted unless configured.

Importing this module imports pika's Twisted adapter, and so installs the default
reactor: only ``make_bus`` and the pipelines' factories import it, when configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure

from cim.backends.link import CLOSE_TIMEOUT, TcpConnections
from cim.interfaces import BusUnavailable
from cim.reactor import ICimReactor

__all__ = [
    "CLOSE_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DEFAULT_HEARTBEAT",
    "AmqpAddress",
    "AmqpConnections",
    "AmqpProtocol",
    "AmqpSession",
    "parse_amqp_url",
]

DEFAULT_HEARTBEAT = 10
"""Seconds, unless the URL says (``?heartbeat=N``). pika checks every heartbeat + 5 s
and drops a connection silent for two checks, so a hung broker or a dead host (no
RST) is left within 30 s and the link reconnects elsewhere or later."""
CONNECT_TIMEOUT = 10.0
"""Seconds for one attempt: TCP, the AMQP handshake, declarations and consumers."""

_pika_log = logging.getLogger("pika")
if _pika_log.level == logging.NOTSET:
    # pika reports every lost connection and returned message itself (returned bodies
    # included); the link reports state changes once. An operator who configures the
    # "pika" logger gets pika's own lines back.
    _pika_log.setLevel(logging.CRITICAL)


# --- where RabbitMQ is ---------------------------------------------------------------


@dataclass(frozen=True)
class AmqpAddress:
    """A parsed amqp:// or amqps:// URL; its str and repr never show the password."""

    host: str
    port: int
    vhost: str
    tls: bool
    parameters: pika.ConnectionParameters = field(repr=False, compare=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} (vhost {self.vhost!r})"

    def endpoint(self, reactor: ICimReactor, timeout: float) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        # IP literals skip name resolution (which would need the reactor's resolver).
        if isIPAddress(self.host):
            endpoint = TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        elif isIPv6Address(self.host):
            endpoint = TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            # Imported here: it needs pyOpenSSL, which plain amqp:// does not.
            from twisted.internet.ssl import optionsForClientTLS

            # The system's trust store and the URL's host name; pika's ssl_options
            # (a stdlib SSLContext) cannot drive Twisted's TLS.
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint


def parse_amqp_url(url: str, connection_name: str = "cim") -> AmqpAddress:
    """amqp[s]://user:password@host[:port]/vhost[?heartbeat=N&...] (pika's URL syntax)."""
    password = urlsplit(url).password if "://" in url else None
    try:
        if not url.startswith(("amqp://", "amqps://")):
            raise ValueError("expected amqp:// or amqps://")
        parameters = pika.URLParameters(url)
    except (ValueError, SyntaxError) as exc:
        message = str(exc)
        if password:
            message = message.replace(password, "***")
        # The URL holds a password: name the problem, never echo the URL.
        raise ValueError(f"not a usable AMQP URL: {message}") from None
    if "heartbeat=" not in (urlsplit(url).query or ""):
        parameters.heartbeat = DEFAULT_HEARTBEAT
    properties = dict(parameters.client_properties or {})
    properties.setdefault("connection_name", connection_name)
    parameters.client_properties = properties
    return AmqpAddress(
        host=parameters.host,
        port=parameters.port,
        vhost=parameters.virtual_host,
        tls=url.startswith("amqps://"),
        parameters=parameters,
    )


# --- one connection ------------------------------------------------------------------


class AmqpProtocol(TwistedProtocolConnection):
    """pika's protocol, saying when the connection ended and why the broker refused."""

    def __init__(self, reactor: ICimReactor, parameters: pika.ConnectionParameters) -> None:
        super().__init__(parameters, custom_reactor=reactor)
        self._clock: IReactorTime = reactor
        self.lost = False
        self.cause: str | None = None
        """Why the broker refused or closed the connection, when it said so."""
        self._why_lost = ""
        self._lost_waiters: list[Deferred[str]] = []
        self._cut_later: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        disconnect = self._impl._adapter_disconnect_stream

        def disconnect_in_bounded_time() -> None:
            # pika ends a connection (after a missed heartbeat, say) with
            # loseConnection, which waits for unsent data to drain: into a hung
            # broker it never does, and the link would stay "connected" to it.
            disconnect()
            if self._cut_later is None and not self.lost:
                self._cut_later = self._clock.callLater(CLOSE_TIMEOUT, self.cut)

        self._impl._adapter_disconnect_stream = disconnect_in_bounded_time

    def when_lost(self) -> Deferred[str]:
        """Fires with the reason once the connection has ended."""
        if self.lost:
            return defer.succeed(self._why_lost)
        d: Deferred[str] = Deferred()
        self._lost_waiters.append(d)
        return d

    def cut(self) -> None:
        """Drop the TCP connection at once (a hung broker cannot hold us up)."""
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self._cut_later is not None and self._cut_later.active():
            self._cut_later.cancel()
        # The broker's Connection.Close (ACCESS_REFUSED, NOT_ALLOWED for a vhost,
        # CONNECTION_FORCED at shutdown) is kept only until pika overwrites it with the
        # transport's ConnectionDone below, and its handshake failure then reports a
        # bare count of attempts: read it first, for the log and for start().
        error = getattr(self._impl, "_error", None)
        if isinstance(error, pika.exceptions.AMQPError) and self.cause is None:
            self.cause = f"{type(error).__name__}: {error}"
        super().connectionLost(reason)
        self._why_lost = self.cause or reason.getErrorMessage()
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(self._why_lost)


class _ProtocolFactory(Factory):
    noisy = False

    def __init__(self, reactor: ICimReactor, address: AmqpAddress) -> None:
        self._reactor = reactor
        self._address = address

    def buildProtocol(self, addr: Any) -> AmqpProtocol:
        protocol = AmqpProtocol(self._reactor, self._address.parameters)
        protocol.factory = self
        return protocol


@dataclass(eq=False)
class AmqpSession:
    """One usable connection: a confirm-mode channel to publish and one per consumer."""

    protocol: AmqpProtocol
    publisher: Any
    """pika's TwistedChannel in confirm mode."""
    timers: set[IDelayedCall] = field(default_factory=set)
    serial: DeferredLock = field(default_factory=DeferredLock)
    """Declarations and consumers added while connected are set up one at a time, in
    the order they were added, as on a new connection."""


OpenSession = Callable[[AmqpProtocol], Deferred[AmqpSession]]


class AmqpConnections(TcpConnections[AmqpProtocol, AmqpSession]):
    """AMQP connections for ``cim.backends.link.Link``.

    ``open_session`` is the prepare step (channels, confirms, declarations and
    consumers), which belongs to the ``AmqpLink`` that keeps them.
    """

    def __init__(
        self,
        reactor: ICimReactor,
        address: AmqpAddress,
        connect_timeout: float,
        open_session: OpenSession,
    ) -> None:
        super().__init__(
            address.endpoint(reactor, connect_timeout), _ProtocolFactory(reactor, address)
        )
        self._open_session = open_session

    def prepare(self, protocol: AmqpProtocol) -> Deferred[AmqpSession]:
        def refused(failure: Failure) -> Failure:
            # The broker's own reason beats whatever pika made of it.
            if protocol.cause is not None:
                return Failure(BusUnavailable(protocol.cause))
            return failure

        return self._open_session(protocol).addErrback(refused)

    def when_lost(self, protocol: AmqpProtocol) -> Deferred[str]:
        return protocol.when_lost()

    def close(self, protocol: AmqpProtocol) -> None:
        if protocol.is_open:
            # Unacknowledged deliveries go back to their queues at once this way.
            protocol.close()
        else:
            protocol.cut()

    def abort(self, protocol: AmqpProtocol) -> None:
        protocol.cut()

    def down(self, usable: AmqpSession) -> None:
        for call in usable.timers:
            if call.active():
                call.cancel()
        usable.timers.clear()
