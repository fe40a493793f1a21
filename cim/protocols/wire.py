"""Framing shared by the node and the client: length prefix, heartbeats, sealing, dispatch.

A frame that fails in any way (too long, not authentic, a type the connection state
does not allow, a body protobuf cannot parse) ends the connection at once and
nothing from it or after it reaches the application: a peer that sends one bad
frame cannot be trusted with the next one (P5 in the architecture).

This is the per-frame hot path, so it avoids per-frame allocations beyond the
frame itself, looks the allow-list up with one dict get, and resolves protobuf
constants at import time.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, cast

from google.protobuf.message import DecodeError, Message
from twisted.internet import tcp
from twisted.internet.interfaces import (
    IConsumer,
    IPullProducer,
    IPushProducer,
    ITCPTransport,
    ITransport,
)
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

from cim.metrics import NodeMetrics
from cim.protocols.crypto import FrameAuthenticationError, FrameOpener, FrameSealer
from cim.protocols.held_writes import HeldWrites
from cim.protocols.outbound import NO_OUTBOUND_ACCOUNTING, OutboundAccounting

__all__ = [
    "ACTIVITY_EVERY",
    "HEARTBEAT_FRAME",
    "TYPE_BYTES",
    "FrameProtocol",
    "Inbound",
    "encode_frame",
]

HEARTBEAT_FRAME = b"\x00\x00\x00\x00"
"""A zero-length frame: the whole heartbeat is its 4-byte length prefix."""

Inbound = Mapping[int, tuple[type[Message], Callable[[Any, Any], None]]]
"""Frame type byte -> (protobuf class, receiver): what a connection state accepts.

The receiver is called as ``receive(protocol, message)``: a plain function (an unbound
method), so one table per class and state serves every connection. Bound methods would
cost each idle connection a dict and a tuple and a method object per frame type, about
1.3 KiB of the few KiB an idle connection is allowed.
"""

_LENGTH = struct.Struct(">I").pack
_UNPACK_LENGTH = struct.Struct(">I").unpack_from
TYPE_BYTES = tuple(bytes((number,)) for number in range(256))
"""Each frame type's byte, made once: a frame is ``TYPE_BYTES[type] + body``."""
_PREFIX_SIZE = 4
_NOTHING_ALLOWED: Inbound = MappingProxyType({})


ACTIVITY_EVERY = 16
"""Frames of one read handled between two ``frame_activity`` calls: a pause the node
decides there (too much queued, the database behind) stops a flooder's read within
this many frames, while a chat's read of a few frames costs one call."""


def encode_frame(frame_type: int, message: Message) -> bytes:
    """``u8 frame type || protobuf``: the plaintext ``FrameProtocol.send_encoded`` seals."""
    return TYPE_BYTES[frame_type] + message.SerializeToString()


# --- writing -------------------------------------------------------------------------
# ``transport.write`` only queues: Twisted then watches the socket for writability
# (an epoll_ctl), sends on the next reactor turn and stops watching (another
# epoll_ctl). For a chat server that is most writes: a frame in, one or two frames
# out. So frames are written straight to the socket when nothing of this connection
# waits in Twisted's buffer, and frames produced while reads are processed are held
# and written once per connection when the outermost read ends (a read carrying eight
# msg:R frames answers with one send of eight msg:A, not eight). Whatever the socket
# does not take goes the normal way, through ``transport.write``, and the connection
# then writes through Twisted until Twisted says its buffer is empty (see _DrainWatch).


@implementer(IPullProducer)
class _DrainWatch:
    """Told by Twisted when a connection's write buffer is empty again.

    Registered (as a pull producer, the consumer API's public way to hear "send more")
    only while some of the connection's bytes wait in Twisted's buffer. Meanwhile the
    connection has no socket to write to and uses ``transport.write``, so nothing
    overtakes them; the watch gives the socket back once they are sent, and tells the
    connection's outbound accounting (cim.protocols.outbound) that nothing waits.
    On a transport without a socket of ours (TLS, tests) it only does the latter.
    """

    __slots__ = ("_protocol", "_socket", "_transport")

    def __init__(
        self, protocol: FrameProtocol, transport: IConsumer, sock: socket.socket | None
    ) -> None:
        self._protocol = protocol
        self._transport = transport
        self._socket = sock

    def resumeProducing(self) -> None:
        protocol = self._protocol
        # ``registerProducer`` asks a pull producer at once, before anything waits.
        if not protocol._watching:
            return
        protocol._watching = False
        protocol._socket = self._socket
        self._transport.unregisterProducer()
        protocol.outbound.drained()

    def stopProducing(self) -> None:
        """The connection is gone; its protocol keeps writing through the transport."""


class _NotEncrypting:
    """Stands in for the sealer until the handshake is done, so send_frame needs no check."""

    def seal(self, plaintext: bytes) -> bytes:
        raise RuntimeError("send_frame before start_encryption; use send_plaintext")

    def release(self) -> None:
        pass


class FrameProtocol(Int32StringReceiver):
    """Length-prefixed frames, heartbeats, encryption and allow-list dispatch.

    Subclasses set ``inbound`` for their connection state and override the hooks
    ``plaintext_frame_received`` (the handshake), ``heartbeat_received``,
    ``frame_activity`` (idle timers, backpressure; called before the first whole frame
    of each read and before every ``ACTIVITY_EVERY``-th after it) and ``ciphers_used``
    (freeing cipher contexts).

    It is a push producer of frames, like Twisted's own receivers: ``pauseProducing``
    stops the transport reading and delivers no further frame, not even one already
    buffered, until ``resumeProducing``; ``stopProducing`` closes the connection.
    """

    # Slots, although Twisted's base classes give every instance a dict anyway: CPython
    # 3.11 keeps the values of an instance dict in a compact array shared-key table
    # only up to 29 attributes per class; the 30th turns every connection's dict
    # into a full one, 1.3 KiB more per idle connection. In slots the attributes cost
    # 8 bytes each however many there are, and the dict holds only what Twisted or a
    # test sets outside them.
    __slots__ = (
        "MAX_LENGTH",
        "_ciphers_warm",
        "_delivering",
        "_held_writes",
        "_opener",
        "_out",
        "_rejected",
        "_sealer",
        "_socket",
        "_unprocessed",
        "_watching",
        "connected",
        "inbound",
        "metrics",
        "outbound",
        "paused",
        "transport",
    )

    log = Logger()

    def __init__(
        self,
        max_frame_size: int,
        metrics: NodeMetrics | None = None,
        held_writes: HeldWrites | None = None,
    ) -> None:
        # Set by makeConnection; a slot has no class-level default to fall back on.
        self.transport: ITransport | None = None
        self.connected = 0
        self.MAX_LENGTH = max_frame_size
        self.metrics = metrics
        self.inbound: Inbound = _NOTHING_ALLOWED
        self._sealer: FrameSealer = _NotEncrypting()
        self._opener: FrameOpener | None = None
        self._rejected = False
        # Set whenever frames must stop: paused by a consumer, or rejected.
        self.paused = False
        # True while this connection's read loop is on the stack.
        self._delivering = False
        # Bytes of a frame not yet complete (or, while paused, of frames not delivered).
        self._unprocessed = b""
        # Frames produced during a read, written when it ends (see HeldWrites).
        self._out: list[bytes] | None = None
        self._held_writes = held_writes if held_writes is not None else HeldWrites()
        # The TCP socket while frames may be written to it directly: None for other
        # transports, and while some of this connection's bytes wait in Twisted's buffer.
        self._socket: socket.socket | None = None
        # True while a _DrainWatch is registered on the transport.
        self._watching = False
        # Told of every byte held or queued, and of the drain (cim.protocols.outbound).
        self.outbound: OutboundAccounting = NO_OUTBOUND_ACCOUNTING
        # True from the first frame sealed or opened until ``release_ciphers``.
        self._ciphers_warm = False

    def makeConnection(self, transport: ITransport) -> None:
        if isinstance(transport, tcp.Connection):
            # Only a plain TCP (or UNIX) connection: a TLS transport's handle is its
            # OpenSSL object, and bytes sent there would bypass the TLS layer's buffer.
            self._socket = transport.getHandle()
        super().makeConnection(transport)

    # ---------------------------------------------------------------- receiving

    def dataReceived(self, data: bytes) -> None:
        """Hand each complete frame to ``stringReceived``; keep the incomplete rest.

        IntNStringReceiver's own loop is not used: it reads ``self.__dict__`` on every
        frame (a compatibility hook), which makes CPython give each connection a real
        dict, about 0.5 KiB more per idle connection, and it goes on dispatching the
        frames after a rejected one. This loop stops at the first rejection, so no
        frame after a bad one reaches the application (P5), and, like Twisted's, at
        ``pauseProducing``: what is left waits in the buffer until ``resumeProducing``.
        """
        if self._rejected:
            # The connection is being torn down; later bytes are dropped, not buffered.
            return
        if self.paused:
            self._unprocessed += data
            return
        held = self._held_writes
        held.depth += 1
        self._delivering = True
        try:
            self._frames_received(data)
        finally:
            self._delivering = False
            held.depth -= 1
            if not held.depth:
                held.flush()

    def _frames_received(self, data: bytes) -> None:
        buffer = self._unprocessed + data if self._unprocessed else data
        end = len(buffer)
        offset = 0
        limit = self.MAX_LENGTH
        countdown = 0
        while end - offset >= _PREFIX_SIZE:
            (length,) = _UNPACK_LENGTH(buffer, offset)
            if length > limit:
                self._unprocessed = b""
                self.lengthLimitExceeded(length)
                return
            start = offset + _PREFIX_SIZE
            stop = start + length
            if stop > end:
                break
            if not countdown:
                # Before the first whole frame of a read, and again every
                # ACTIVITY_EVERY frames of a long one (a flood's 64 KiB read carries
                # hundreds): the idle timer and the node's backpressure look cost a
                # call each, and a chat's read carries a few frames.
                countdown = ACTIVITY_EVERY
                self.frame_activity()
                if self.paused:  # the node stopped reading us: this frame waits too
                    break
            countdown -= 1
            offset = stop
            self.stringReceived(buffer[start:stop])
            # One check per frame covers both ways frames stop (rejection pauses too).
            if self.paused:
                if self._rejected:
                    return
                break
        self._unprocessed = buffer[offset:] if offset else buffer

    def pauseProducing(self) -> None:
        """Deliver no further frame and stop reading until ``resumeProducing``."""
        self.paused = True
        if self.transport is not None:
            cast(IPushProducer, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        """Read again, and deliver at once the whole frames that waited in the buffer."""
        if self._rejected:
            return
        self.paused = False
        if self.transport is not None:
            cast(IPushProducer, self.transport).resumeProducing()
        # Resumed from inside this connection's own frame handling, the loop running
        # below goes on by itself; otherwise the waiting frames are delivered now.
        if not self._delivering:
            self.dataReceived(b"")

    def stringReceived(self, body: bytes) -> None:
        metrics = self.metrics
        if not body:
            if metrics is not None:
                metrics.heartbeats_in += 1
                metrics.bytes_in += _PREFIX_SIZE
            self.heartbeat_received()
            # Heartbeats flow only while the connection is idle: a good moment to free
            # the cipher contexts an idle connection does not need.
            if self._ciphers_warm:
                self.release_ciphers()
            return
        if metrics is not None:
            metrics.bytes_in += _PREFIX_SIZE + len(body)
        opener = self._opener
        if opener is None:
            if metrics is not None:
                metrics.frames_in[body[0]] += 1
            self.plaintext_frame_received(body)
            return
        try:
            plaintext = opener.open(body)
        except FrameAuthenticationError:
            self.frame_rejected("authentication")
            return
        if not self._ciphers_warm:
            self._ciphers_warm = True
            self.ciphers_used()
        self.dispatch_plaintext(plaintext)

    def dispatch_plaintext(self, plaintext: bytes) -> None:
        """Parse an opened frame and hand it to the receiver the current state allows.

        Public so the client can feed the LOGIN_RESULT that came sealed inside the
        handshake reply through the same checks as every later frame.
        """
        if not plaintext:
            self.frame_rejected("empty")
            return
        frame_type = plaintext[0]
        entry = self.inbound.get(frame_type)
        if entry is None:
            self.frame_rejected("unexpected frame type", f"type {frame_type}")
            return
        message_class, receive = entry
        message = message_class()
        try:
            message.ParseFromString(plaintext[1:])
        except DecodeError:
            self.frame_rejected("malformed", f"type {frame_type}")
            return
        metrics = self.metrics
        if metrics is not None:
            metrics.frames_in[frame_type] += 1
        receive(self, message)

    def lengthLimitExceeded(self, length: int) -> None:
        self.frame_rejected("oversized", f"{length} bytes, limit {self.MAX_LENGTH}")

    # ------------------------------------------------------------------ sending

    @property
    def tcp(self) -> ITCPTransport:
        """The transport, typed: every cim connection runs over a stream transport."""
        return cast(ITCPTransport, self.transport)

    def start_encryption(self, sealer: FrameSealer, opener: FrameOpener) -> None:
        """Every frame after this one is sealed and opened; heartbeats stay plain."""
        if self._opener is not None:
            raise RuntimeError("encryption already started")
        self._sealer = sealer
        self._opener = opener
        # The handshake sealed the first frame: the sealer holds its context now.
        self._ciphers_warm = True
        self.ciphers_used()

    def release_ciphers(self) -> None:
        """Free the cipher contexts the next frame can rebuild (the connection is quiet).

        About 2.3 KiB of OpenSSL state each for chacha20-poly1305, more than the rest
        of an idle connection; nothing for rc4-hmac-sha256, whose keystream runs on.
        """
        self._ciphers_warm = False
        self._sealer.release()
        if self._opener is not None:
            self._opener.release()

    def send_frame(self, frame_type: int, message: Message) -> None:
        self._send_one(TYPE_BYTES[frame_type] + message.SerializeToString())

    def send_encoded(self, *frames: bytes) -> None:
        """Seal and send frames made by ``encode_frame``, in one write: a message that
        goes to many connections (a group's msg:N) is serialized once, and only sealed
        per connection (each has its own keys and counter)."""
        if len(frames) == 1:
            self._send_one(frames[0])
            return
        seal = self._sealer.seal
        if not self._ciphers_warm:
            self._ciphers_warm = True
            self.ciphers_used()
        metrics = self.metrics
        parts = []
        for frame in frames:
            body = seal(frame)
            parts.append(_LENGTH(len(body)))
            parts.append(body)
            if metrics is not None:
                metrics.frames_out[frame[0]] += 1
                metrics.bytes_out += _PREFIX_SIZE + len(body)
        if parts:
            self._emit(b"".join(parts))

    def _send_one(self, frame: bytes) -> None:
        """One frame sealed and written: every frame a connection answers or receives
        (four for each 1:1 message) comes this way."""
        if not self._ciphers_warm:
            self._ciphers_warm = True
            self.ciphers_used()
        body = self._sealer.seal(frame)
        size = len(body)
        self._emit(_LENGTH(size) + body)
        metrics = self.metrics
        if metrics is not None:
            metrics.frames_out[frame[0]] += 1
            metrics.bytes_out += _PREFIX_SIZE + size

    def send_plaintext(self, body: bytes) -> None:
        """Send a handshake frame body (type byte included) without sealing it."""
        if not body:
            raise ValueError("an empty body is a heartbeat; use send_heartbeat")
        self._emit(_LENGTH(len(body)) + body)
        metrics = self.metrics
        if metrics is not None:
            metrics.frames_out[body[0]] += 1
            metrics.bytes_out += _PREFIX_SIZE + len(body)

    def send_heartbeat(self) -> None:
        self._emit(HEARTBEAT_FRAME)
        metrics = self.metrics
        if metrics is not None:
            metrics.heartbeats_out += 1
            metrics.bytes_out += _PREFIX_SIZE

    def _emit(self, data: bytes) -> None:
        if self.transport is None:
            return
        held = self._held_writes
        if not held.depth:
            self._send(data)
            return
        out = self._out
        if out is None:
            self._out = [data]
            held.connections.append(self)
        else:
            out.append(data)
        self.outbound.held(len(data))

    def _send(self, data: bytes) -> None:
        """Send on the socket at once when none of this connection's bytes wait in
        Twisted's buffer, else queue behind them with ``transport.write``.

        Only a plain, open TCP transport is written directly; anything else (a closing
        transport, TLS, a test transport) uses ``transport.write``, which keeps
        Twisted's ordering and error handling.
        """
        transport: Any = self.transport
        sock = self._socket
        if sock is None or transport.disconnecting or not transport.connected:
            transport.write(data)
            self.outbound.queued(len(data))
            if (
                sock is None
                and not self._watching
                and self.outbound.counting
                and not transport.disconnecting
            ):
                # Not a socket of ours (TLS, tests): only the accounting needs the drain.
                self._watch_drain(transport, None)
            return
        try:
            sent = sock.send(data)
        except OSError:
            # EAGAIN, or a broken connection that Twisted's own write path will report.
            sent = 0
        if sent < len(data):
            rest = data[sent:] if sent else data
            transport.write(rest)
            self.outbound.queued(len(rest))
            self._watch_drain(transport, sock)
            # Taken after registering: Twisted asks a new pull producer for data at once.
            self._socket = None

    def _watch_drain(self, transport: IConsumer, sock: socket.socket | None) -> None:
        # If someone else's producer holds the transport (RuntimeError), Twisted will
        # not say when its buffer empties, so this connection writes through it for good.
        register = getattr(transport, "registerProducer", None)
        if register is None:
            return  # not a consumer (a test's bare transport): nobody will say
        with contextlib.suppress(RuntimeError):
            register(_DrainWatch(self, transport, sock), False)
            self._watching = True

    def lose_connection(self) -> None:
        """Close once everything sent so far is on its way, frames held by a read too."""
        self.flush_held()
        if self.transport is not None:
            self.transport.loseConnection()

    def flush_held(self) -> None:
        """Write the frames held during the read that just ended, in one send."""
        out = self._out
        if out is None:
            return
        self._out = None
        data = out[0] if len(out) == 1 else b"".join(out)
        if self.transport is not None:
            self._send(data)
        self.outbound.released(len(data))

    # ---------------------------------------------------------------- rejection

    def frame_rejected(self, reason: str, detail: str = "") -> None:
        """Stop reading, log one line, count it and drop the connection.

        ``reason`` is a short fixed label (it becomes a metrics label); ``detail``
        may say more but must never contain payload or key material.
        """
        if self._rejected:
            return
        self._rejected = True
        self.paused = True
        transport: Any = self.transport
        peer = transport.getPeer() if transport is not None else None
        self.log.warn(
            "Closing connection from {peer}: {reason}{detail}",
            peer=_describe_peer(peer),
            reason=reason,
            detail=f" ({detail})" if detail else "",
        )
        if self.metrics is not None:
            self.metrics.frames_rejected[reason] += 1
        self.close_rejected()

    def close_rejected(self) -> None:
        """Drop the connection without flushing: a hostile peer need not read.

        A subclass that sends a last frame before closing can override this to use
        ``loseConnection`` (with its own deadline) so the frame is delivered.
        """
        transport: Any = self.transport
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    # -------------------------------------------------------- hooks (no-op default)

    def heartbeat_received(self) -> None:
        pass

    def plaintext_frame_received(self, body: bytes) -> None:
        self.frame_rejected("unexpected plaintext")

    def frame_activity(self) -> None:
        pass

    def ciphers_used(self) -> None:
        """A frame was sealed or opened since ``release_ciphers``: a node that wants its
        quiet connections' cipher contexts freed soon arranges a ``release_ciphers``."""


def _describe_peer(peer: object) -> str:
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(peer)
