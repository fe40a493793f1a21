"""The IM connection protocol over WebSocket: one binary message is one cim frame.

The node has one implementation of a client connection, ``ImServerProtocol`` on
``FrameProtocol`` (cim.protocols.wire): the handshake, the cipher suites, the
allow-lists, the six packets, heartbeats, deadlines and backpressure. It speaks to a
stream transport: length-prefixed frames come up through ``dataReceived`` and go
down through ``transport.write``. ``MessageTransport`` is that stream transport made
of a WebSocket connection, so the same protocol object serves a browser:

- up: each binary message is handed to ``dataReceived`` with its length prefix put
  back, so pausing, rejection and the frame-size limit work exactly as on TCP (an
  empty message is a zero-length frame: the heartbeat);
- down: what the protocol writes is always whole length-prefixed frames; each
  becomes one binary message, the prefix dropped;
- backpressure: pausing and resuming reading, and the drain watch (a pull producer
  told when the transport's buffer is empty), go to the TCP (or TLS) transport under
  the WebSocket, which holds the bytes the client has not read.

What WebSocket adds is refused here: text messages, and pings (WebSocket's or cim's
heartbeats) faster than ``max_pings_per_second``. The autobahn protocol
(cim.protocols.gateway, and the client's in cim.client.websocket) only forwards
to this class, so it is tested with a fake.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Protocol

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IProducer,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.protocols.wire import FrameProtocol

__all__ = [
    "CLOSE_POLICY",
    "CLOSE_UNSUPPORTED",
    "FramesOverMessages",
    "MessageTransport",
    "WebSocketChannel",
]

CLOSE_UNSUPPORTED = 1003
"""WebSocket close code: a data type the endpoint cannot accept (text)."""
CLOSE_POLICY = 1008
"""WebSocket close code: a message that violates the endpoint's policy."""

_PREFIX = struct.Struct(">I")
_PACK = _PREFIX.pack
_UNPACK = _PREFIX.unpack_from


class WebSocketChannel(Protocol):
    """What the adapter needs of an open WebSocket connection (autobahn's protocol)."""

    transport: Any
    """The stream under the WebSocket (TCP or TLS): reading, writing, producers."""

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None: ...

    def close_with(self, code: int, reason: str) -> None:
        """Send a close frame with any code (1003 and 1008 too), then wait for the
        peer's answer until a deadline."""

    def sendPong(self, payload: bytes | None = None) -> None: ...

    def dropConnection(self, abort: bool = False) -> None: ...

    def sending_allowed(self) -> bool:
        """Whether messages may still be sent (not after a close frame either way)."""


@implementer(ITransport, IConsumer, IPushProducer)
class MessageTransport:
    """A WebSocket connection presented to a ``FrameProtocol`` as its stream transport.

    ``abortConnection`` (a rejected frame, a deadline, a slow reader) drops the TCP
    connection at once, as on TCP; ``loseConnection`` (after a last frame such as a
    handshake refusal or GOING_AWAY) closes the WebSocket cleanly once what was sent
    is on its way, and autobahn's close deadline drops a peer that never answers.
    """

    __slots__ = (
        "_close_with",
        "_ping_count",
        "_ping_window",
        "channel",
        "clock",
        "connected",
        "disconnecting",
        "max_pings_per_second",
        "protocol",
    )

    def __init__(
        self, channel: WebSocketChannel, clock: IReactorTime, max_pings_per_second: int
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.max_pings_per_second = max_pings_per_second
        self.protocol: FrameProtocol | None = None
        self.connected = False
        self.disconnecting = False
        # A WebSocket close code and reason to send instead of dropping the connection.
        self._close_with: tuple[int, str] | None = None
        self._ping_window = 0.0
        self._ping_count = 0

    def attach(self, protocol: FrameProtocol) -> None:
        """Start ``protocol`` on this transport (its ``connectionMade`` runs now)."""
        self.protocol = protocol
        self.connected = True
        protocol.makeConnection(self)

    # --- up: messages to frames -------------------------------------------------------

    def message_received(self, payload: bytes, is_binary: bool) -> None:
        protocol = self.protocol
        if protocol is None or self.disconnecting:
            return
        if not is_binary:
            self._refuse(CLOSE_UNSUPPORTED, "cim frames are binary messages", "text message")
            return
        if not payload and not self._ping_allowed():
            return
        # The prefix restored: the frame-size limit, pausing and rejection are the
        # framing's own, exactly as for a TCP read holding this one frame.
        protocol.dataReceived(_PACK(len(payload)) + payload)

    def ping_received(self, payload: bytes) -> None:
        """A WebSocket ping: answered like a heartbeat, and counted like one."""
        if self.protocol is None or self.disconnecting:
            return
        if self._ping_allowed():
            self.channel.sendPong(payload)

    def _ping_allowed(self) -> bool:
        now = self.clock.seconds()
        if now - self._ping_window >= 1.0:
            self._ping_window = now
            self._ping_count = 0
        self._ping_count += 1
        if self._ping_count <= self.max_pings_per_second:
            return True
        self._refuse(CLOSE_POLICY, "too many pings", "ping flood")
        return False

    def _refuse(self, code: int, reason: str, label: str) -> None:
        """Rejected through the framing (one log line, the metric, nothing more read),
        closed with a WebSocket close code the page can show."""
        self._close_with = (code, reason)
        assert self.protocol is not None
        self.protocol.frame_rejected(label)

    def connection_lost(self, reason: Failure) -> None:
        protocol = self.protocol
        if protocol is None or not self.connected:
            return
        self.connected = False
        self.disconnecting = True
        protocol.connectionLost(reason)

    # --- down: frames to messages (ITransport) ----------------------------------------

    def write(self, data: bytes) -> None:
        """Whole length-prefixed frames (all FrameProtocol writes), one message each.

        Once closing (our close frame, the peer's, or a dropped connection) nothing
        more may be sent, and frames for this connection are dropped as a TCP
        transport drops writes after ``abortConnection``: the rooms delivering to a
        session that is going away must not fail for it.
        """
        if not self.connected or self.disconnecting or not self.channel.sending_allowed():
            return
        send = self.channel.sendMessage
        end = len(data)
        offset = 0
        while offset < end:
            (length,) = _UNPACK(data, offset)
            start = offset + 4
            offset = start + length
            send(data[start:offset], True)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting or not self.connected:
            return
        self.disconnecting = True
        code, reason = self._close_with or (1000, "")
        self.channel.close_with(code, reason)

    def abortConnection(self) -> None:
        if self._close_with is not None:
            # A protocol violation the page should be told about: the close frame,
            # then autobahn's close deadline if the peer does not answer.
            self.loseConnection()
            return
        self.disconnecting = True
        self.channel.dropConnection(abort=True)

    def getPeer(self) -> IAddress:
        return self.channel.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.channel.transport.getHost()

    # --- producers: straight to the stream under the WebSocket -------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.channel.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.channel.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.channel.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.connected and not self.disconnecting:
            self.channel.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()


class FramesOverMessages:
    """What an autobahn protocol (the gateway's, the client's) hands its MessageTransport.

    Mixed into autobahn's server and client protocols, in front of them in the MRO:
    messages and pings go to ``frames``, a lost connection reaches the protocol on it,
    and ``close_with`` sends any close code.
    """

    frames: MessageTransport | None = None

    def sending_allowed(self) -> bool:
        channel: Any = self
        return bool(channel.state == WebSocketProtocol.STATE_OPEN)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.frames is not None:
            self.frames.message_received(payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        if self.frames is not None:
            self.frames.ping_received(payload)

    def close_with(self, code: int, reason: str) -> None:
        # sendClose takes only 1000 and 3000-4999 (codes for applications); the
        # protocol's own codes (1003 text, 1008 policy) need the frame-level call.
        channel: Any = self
        channel.sendCloseFrame(code, reason.encode() if reason else None, isReply=False)

    def frames_lost(self, reason: Failure) -> None:
        if self.frames is not None:
            self.frames.connection_lost(reason)
