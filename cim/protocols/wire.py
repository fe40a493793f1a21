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

import struct
from collections.abc import Callable, Mapping
from typing import Any, cast

from google.protobuf.message import DecodeError, Message
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from cim.metrics import NodeMetrics
from cim.protocols.crypto import FrameAuthenticationError, FrameOpener, FrameSealer

__all__ = ["HEARTBEAT_FRAME", "FrameProtocol", "Inbound"]

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
_TYPE_BYTES = tuple(bytes((number,)) for number in range(256))
_PREFIX_SIZE = 4
_NOTHING_ALLOWED: Inbound = {}


# --- writing -------------------------------------------------------------------------
# ``transport.write`` only queues: Twisted then watches the socket for writability
# (an epoll_ctl), sends on the next reactor turn and stops watching (another
# epoll_ctl). For a chat server that is most writes: a frame in, one or two frames
# out. So frames are written straight to the socket when nothing is queued ahead of
# them, and frames produced while a connection's bytes are being processed are held
# and written once per connection when that processing ends (a read carrying eight
# msg:R frames answers with one send of eight msg:A, not eight). Whatever the socket
# does not take goes the normal way, through ``transport.write``.

_held: list[FrameProtocol] = []
"""Connections holding frames until the read being processed ends."""
_reading = 0
"""How many ``dataReceived`` calls are on the stack (a read can cause another)."""


def send_now(transport: Any, data: bytes) -> None:
    """Send on the socket at once when Twisted has nothing queued for it, else queue.

    Only a plain, open TCP transport with an empty write buffer is written directly;
    anything else (a closing or paused transport, a test transport) uses
    ``transport.write``, which keeps Twisted's ordering and error handling.
    """
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or transport.dataBuffer
        or transport._tempDataBuffer
        or not transport.connected
        or transport.disconnecting
        or transport.producer is not None
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except OSError:
        # EAGAIN, or a broken connection that Twisted's own write path will report.
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)


def _flush_held() -> None:
    while _held:
        connections = list(_held)
        _held.clear()
        for connection in connections:
            connection.flush_held()


class _NotEncrypting:
    """Stands in for the sealer until the handshake is done, so send_frame needs no check."""

    def seal(self, plaintext: bytes) -> bytes:
        raise RuntimeError("send_frame before start_encryption; use send_plaintext")

    def release(self) -> None:
        pass


class FrameProtocol(Int32StringReceiver):
    """Length-prefixed frames, heartbeats, encryption and allow-list dispatch.

    Subclasses set ``inbound`` for their connection state and override the hooks
    ``plaintext_frame_received`` (the handshake), ``heartbeat_received`` and
    ``frame_activity`` (idle timers).
    """

    log = Logger()

    def __init__(self, max_frame_size: int, metrics: NodeMetrics | None = None) -> None:
        self.MAX_LENGTH = max_frame_size
        self.metrics = metrics
        self.inbound: Inbound = _NOTHING_ALLOWED
        self._sealer: FrameSealer = _NotEncrypting()
        self._opener: FrameOpener | None = None
        self._rejected = False
        # Bytes of a frame not yet complete.
        self._unprocessed = b""
        # Frames produced during a read, written when it ends (see send_now).
        self._out: list[bytes] | None = None

    # ---------------------------------------------------------------- receiving

    def dataReceived(self, data: bytes) -> None:
        """Hand each complete frame to ``stringReceived``; keep the incomplete rest.

        IntNStringReceiver's own loop is not used: it reads ``self.__dict__`` on every
        frame (a compatibility hook), which makes CPython give each connection a real
        dict, about 0.5 KiB more per idle connection, and it goes on dispatching the
        frames after a rejected one. This loop stops at the first rejection, so no
        frame after a bad one reaches the application (P5).
        """
        if self._rejected:
            # The connection is being torn down; later bytes are dropped, not buffered.
            return
        global _reading
        _reading += 1
        try:
            self._frames_received(data)
        finally:
            _reading -= 1
            if not _reading:
                _flush_held()

    def _frames_received(self, data: bytes) -> None:
        buffer = self._unprocessed + data if self._unprocessed else data
        end = len(buffer)
        offset = 0
        limit = self.MAX_LENGTH
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
            offset = stop
            self.stringReceived(buffer[start:stop])
            if self._rejected:
                return
        self._unprocessed = buffer[offset:] if offset else buffer

    def stringReceived(self, body: bytes) -> None:
        self.frame_activity()
        metrics = self.metrics
        if not body:
            if metrics is not None:
                metrics.heartbeats_in += 1
                metrics.bytes_in += _PREFIX_SIZE
            self.heartbeat_received()
            # Heartbeats flow only while the connection is idle: a good moment to free
            # the cipher contexts an idle connection does not need.
            self._sealer.release()
            if self._opener is not None:
                self._opener.release()
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

    def send_frame(self, frame_type: int, message: Message) -> None:
        body = self._sealer.seal(_TYPE_BYTES[frame_type] + message.SerializeToString())
        self._emit(_LENGTH(len(body)) + body)
        metrics = self.metrics
        if metrics is not None:
            metrics.frames_out[frame_type] += 1
            metrics.bytes_out += _PREFIX_SIZE + len(body)

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
        if not _reading:
            send_now(self.transport, data)
            return
        out = self._out
        if out is None:
            self._out = [data]
            _held.append(self)
        else:
            out.append(data)

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
        if self.transport is not None:
            send_now(self.transport, out[0] if len(out) == 1 else b"".join(out))

    # ---------------------------------------------------------------- rejection

    def frame_rejected(self, reason: str, detail: str = "") -> None:
        """Stop reading, log one line, count it and drop the connection.

        ``reason`` is a short fixed label (it becomes a metrics label); ``detail``
        may say more but must never contain payload or key material.
        """
        if self._rejected:
            return
        self._rejected = True
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


def _describe_peer(peer: object) -> str:
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(peer)
