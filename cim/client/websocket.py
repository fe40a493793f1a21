"""The client library's connection over the WebSocket gateway (``ws://``, ``wss://``).

The same ``ImClientProtocol`` (cim.client.connection) as on TCP, on a
``MessageTransport`` (one binary message per frame, cim.protocols.websocket) under
autobahn's client protocol: what a browser does, for tests and for networks that let
only HTTP(S) through.
``connect_websocket`` fires once the upgrade is done (the cim hello is then on its
way); a refused upgrade (a wrong origin, a full node) fails it with ``ConnectError``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from cim.protocols.gateway import CLOSE_HANDSHAKE_TIMEOUT, ClockTimer
from cim.protocols.websocket import FramesOverMessages, MessageTransport
from cim.protocols.wire import FrameProtocol
from cim.reactor import ICimReactor

__all__ = ["connect_websocket"]

UPGRADE_TIMEOUT = 10.0
NODE_PINGS_PER_SECOND = 1000
"""The node pings never and answers our heartbeats only: no limit worth enforcing."""


class _ClientChannel(FramesOverMessages, WebSocketClientProtocol):  # type: ignore[misc]
    factory: _ClientFactory

    def onOpen(self) -> None:
        factory = self.factory
        frames = MessageTransport(self, factory.clock, NODE_PINGS_PER_SECOND)
        self.frames = frames
        frames.attach(factory.im)
        if not factory.opened.called:
            factory.opened.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is None:
            reason = Failure(ConnectionError("connection lost"))
        super().connectionLost(reason)
        opened = self.factory.opened
        if not opened.called:
            why = getattr(self, "wasNotCleanReason", None) or "the WebSocket upgrade failed"
            opened.errback(ConnectError(string=str(why)))
        self.frames_lost(reason)


class _ClientFactory(WebSocketClientFactory):
    protocol = _ClientChannel  # type: ignore[assignment]

    def __init__(self, url: str, reactor: ICimReactor, im: FrameProtocol) -> None:
        super().__init__(url, reactor=reactor)
        self._batched_timer = ClockTimer(reactor)
        self.clock = reactor
        self.im = im
        self.opened: Deferred[None] = Deferred()
        self.setProtocolOptions(
            maxMessagePayloadSize=im.MAX_LENGTH,
            maxFramePayloadSize=im.MAX_LENGTH,
            openHandshakeTimeout=UPGRADE_TIMEOUT,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            autoPingInterval=0,
            failByDrop=False,
        )


def connect_websocket(reactor: ICimReactor, url: str, protocol: FrameProtocol) -> Deferred[Any]:
    """Open ``url`` and start ``protocol`` (the client's, or the benchmark's lean one)
    on it once the upgrade is done."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    factory = _ClientFactory(url, reactor, protocol)
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=10)
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    connected: Deferred[Any] = endpoint.connect(factory)
    connected.addCallback(lambda _channel: factory.opened)
    return connected
