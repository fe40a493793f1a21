"""The WebSocket gateway: autobahn's server protocol in front of the IM connection.

Autobahn does the HTTP upgrade and the WebSocket framing; everything cim is the IM
node's own connection protocol (``ImServerProtocol``, from the IM factory the TCP
port uses), started on a ``MessageTransport`` (cim.protocols.websocket) once the
upgrade is done. So a browser is the same kind of session as a phone on TCP: same
handshake, same allow-lists, same rooms, counted in the same per-address limit and
drained at stop with the rest.

Added here, before the upgrade: the page's ``Origin`` must be in ``[ws]
allowed_origins`` (a request without one is not from a browser page and goes on),
and autobahn is told the ``[im]`` limits: the largest message (``max_frame_size``)
and the deadline of the upgrade (``handshake_timeout``; the cim hello then has its
own, as on TCP).
"""

from __future__ import annotations

import inspect
from typing import Any, cast

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.config import WsConfig
from cim.http.cors import OriginPolicy
from cim.protocols.im_listener import ImServerFactory
from cim.protocols.websocket import FramesOverMessages, MessageTransport

__all__ = ["CLOSE_HANDSHAKE_TIMEOUT", "ClockTimer", "GatewayFactory", "GatewayProtocol"]

CLOSE_HANDSHAKE_TIMEOUT = 1.0
"""Seconds a peer has to answer our close frame before the connection is dropped."""
MAX_UPGRADE_BYTES = 16384
"""The upgrade request's size at most (autobahn buffers it without a bound until its
end or the deadline); a browser's is well under 2 KiB."""


_UPGRADE_LEFTOVERS = (
    "http_headers",
    "http_request_data",
    "http_response_data",
    "http_request_params",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_host",
    "_wskey",
    "websocket_origin",
)
"""What autobahn keeps of the upgrade and never reads once the connection is open."""


class GatewayProtocol(FramesOverMessages, WebSocketServerProtocol):  # type: ignore[misc]
    """One browser connection: the upgrade here, the IM connection behind it."""

    factory: GatewayFactory
    upgrading: str | None = None
    """The peer's host while the upgrade is under way (counted by the factory)."""
    refused = False
    upgrade_bytes = 0
    log = Logger()

    def connectionMade(self) -> None:
        stream: Any = self.transport
        host = getattr(stream.getPeer(), "host", "?")
        if not self.factory.admit_upgrade(host):
            # Over [im] max_connections_per_address before any byte is read, as the
            # TCP port refuses it (there with a handshake error frame; here nothing
            # WebSocket can carry yet).
            self.factory.im.metrics.connections_refused["per_address_limit"] += 1
            self.refused = True
            stream.abortConnection()
            return
        self.upgrading = host
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self.upgrading is not None:
            self.upgrade_bytes += len(data)
            if self.upgrade_bytes > MAX_UPGRADE_BYTES:
                self.factory.im.metrics.connections_refused["upgrade_too_large"] += 1
                self._upgraded()
                stream: Any = self.transport
                stream.abortConnection()
                return
        super().dataReceived(data)

    def onConnect(self, request: ConnectionRequest) -> None:
        origin = request.headers.get("origin")
        if origin is not None and not self.factory.origins.allows(origin):
            self.factory.im.metrics.connections_refused["origin"] += 1
            self.log.info(
                "WebSocket upgrade from {peer} refused: origin {origin} not allowed",
                peer=request.peer,
                origin=origin[:200],
            )
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")

    def onOpen(self) -> None:
        factory = self.factory
        self._upgraded()
        # What autobahn keeps of the upgrade (for its own test suite): about 1.5 KiB
        # of each idle connection (docs/benchmarks.md, figure 9).
        kept = self.__dict__
        for name in _UPGRADE_LEFTOVERS:
            kept.pop(name, None)
        frames = MessageTransport(self, factory.clock, factory.config.max_pings_per_second)
        self.frames = frames
        factory.im.metrics.websocket_open += 1
        frames.attach(factory.im.buildProtocol(frames.getPeer()))

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is None:
            reason = Failure(ConnectionError("connection lost"))
        self._upgraded()
        if self.refused:
            return  # refused in connectionMade: autobahn never started
        super().connectionLost(reason)
        if self.frames is not None:
            self.factory.im.metrics.websocket_open -= 1
        self.frames_lost(reason)

    def _upgraded(self) -> None:
        """The upgrade is over (done or failed): the IM factory counts from here."""
        if self.upgrading is not None:
            self.factory.upgrade_done(self.upgrading)
            self.upgrading = None


class ClockTimer:
    """autobahn's timer interface (``call_later``) on a given clock.

    autobahn batches its timers into 200 ms buckets on txaio's global reactor; the
    gateway's timers are the upgrade and close deadlines only (heartbeats are cim's,
    on the IM factory's sweeper), each short-lived, so plain calls on the clock the
    rest of the node uses (a fake one in tests) cost nothing while connections idle.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, func, *args, **kwargs)


class GatewayFactory(WebSocketServerFactory):
    """The ``[ws]`` port's factory: its connections are the IM factory's connections."""

    protocol = GatewayProtocol  # type: ignore[assignment]

    def __init__(
        self, config: WsConfig, im: ImServerFactory, clock: IReactorTime, reactor: Any = None
    ) -> None:
        super().__init__(reactor=reactor if reactor is not None else clock)
        # autobahn's deadlines (upgrade, close) on our clock, not txaio's global one.
        self._batched_timer = ClockTimer(clock)
        self.config = config
        self.im = im
        self.clock = clock
        self.origins = OriginPolicy(config.allowed_origins)
        # Connections per address still upgrading; with the IM factory's own count
        # they stay within [im] max_connections_per_address.
        self._upgrading: dict[str, int] = {}
        self.isSecure = config.listen.startswith("ssl:")
        limits = im.config
        self.setProtocolOptions(
            maxMessagePayloadSize=limits.max_frame_size,
            maxFramePayloadSize=limits.max_frame_size,
            openHandshakeTimeout=limits.handshake_timeout,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            # A violation is answered with a close frame the page can show (1003,
            # 1008, 1009), then dropped if the peer does not answer in time.
            failByDrop=False,
            # Heartbeats are cim's own (empty messages), as on TCP.
            autoPingInterval=0,
            # The origin is checked in onConnect, with the same policy as CORS.
            allowedOrigins=["*"],
        )
        # autobahn copies its ~30 options into each connection's own dictionary unless
        # the protocol class has them: a protocol class of this factory's own holds
        # them once for all its connections (docs/benchmarks.md, figure 9).
        # A function among them (perMessageCompressionAccept) must stay a plain function,
        # not become a method of the connection.
        options = {
            name: staticmethod(value) if inspect.isfunction(value) else value
            for name, value in ((n, getattr(self, n)) for n in GatewayProtocol.CONFIG_ATTRS)
        }
        self.protocol = cast(
            "type[GatewayProtocol]", type("GatewayProtocol", (GatewayProtocol,), options)
        )

    def admit_upgrade(self, host: str) -> bool:
        pending = self._upgrading.get(host, 0)
        if pending + self.im.connections_from(host) >= self.im.config.max_connections_per_address:
            return False
        self._upgrading[host] = pending + 1
        return True

    def upgrade_done(self, host: str) -> None:
        pending = self._upgrading.get(host, 0) - 1
        if pending > 0:
            self._upgrading[host] = pending
        else:
            self._upgrading.pop(host, None)
