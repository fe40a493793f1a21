"""The load generator's clients: the router login over bare HTTP, one lean IM
connection per user, and the counts they keep (``bench.loadgen`` drives them).

What keeps a client cheap, and what it counts, is described in ``bench.loadgen``.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from cim.client.acks import GROUP_ACK_EVERY
from cim.client.router import LoginTicket
from cim.config import KNOWN_SUITES
from cim.protocols import cim_pb2
from cim.protocols.handshake import ClientHandshake, HandshakeRefused, Resumption
from cim.protocols.wire import HEARTBEAT_FRAME, FrameProtocol

reactor: Any = _reactor

if TYPE_CHECKING:
    from bench.loadgen import Worker

T = TypeVar("T")

MAX_FRAME = 1 << 20
DEVICE = "bench"

# Frame type bytes, resolved once (enum attribute lookups are not free).
_LOGIN_RESULT_OK = cim_pb2.LoginResult.OK
_MSG_R = cim_pb2.MSG_R
_MSG_A = cim_pb2.MSG_A
_MSG_N = cim_pb2.MSG_N
_ACK_R = cim_pb2.ACK_R
_ACK_A = cim_pb2.ACK_A
_ACK_N = cim_pb2.ACK_N
_KICKED = cim_pb2.KICKED
_GOING_AWAY = cim_pb2.GOING_AWAY
_ERROR = cim_pb2.ERROR
_DELIVERED = cim_pb2.DELIVERED
_ACCEPTED = cim_pb2.ACCEPTED
_STORED = cim_pb2.STORED
_OFFLINE_R = cim_pb2.OFFLINE_R
_OFFLINE_A = cim_pb2.OFFLINE_A
_OFFLINE_ACK_R = cim_pb2.OFFLINE_ACK_R
_OFFLINE_ACK_A = cim_pb2.OFFLINE_ACK_A
_OFFLINE_NOTICE = cim_pb2.OFFLINE_NOTICE
_GROUP_R = cim_pb2.GROUP_R
_GROUP_A = cim_pb2.GROUP_A
_ANSWERS = frozenset((_OFFLINE_A, _OFFLINE_ACK_A, _GROUP_A))
"""Answers to the few requests a bench client makes outside the message flow; each
type is answered in the order asked, so one FIFO per type pairs them."""
_Message = cim_pb2.Message
_AckN = cim_pb2.AckN
_Error = cim_pb2.Error

TEXT_SIZE = 80
"""Bytes of message text: a 20-digit send timestamp and padding; msg:N is ~120 bytes."""
_STAMP_DIGITS = 20
_PADDING = b"." * (TEXT_SIZE - _STAMP_DIGITS)
_TEXT_TAG = b"\x2a" + bytes((TEXT_SIZE,))  # Message.text (field 5), length-delimited
_TO_TAG = b"\x1a"  # Message.to (field 3), length-delimited
_GROUP_TAG = b"\x52"  # Message.group (field 10), length-delimited
_SEQ_TAG = b"\x30"  # Message.client_seq (field 6), varint
_ACK_R_HEAD = bytes((_ACK_R,)) + b"\x08"  # AckR.msg_id (field 1), varint
_SMALL_VARINTS = tuple(bytes((n,)) for n in range(128))
_monotonic_ns = time.monotonic_ns


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_prefix(size: int) -> bytes:
    return size.to_bytes(4, "big")


class BenchError(Exception):
    """A client-side step failed; the message is a short, countable label."""


# --------------------------------------------------------------------- router login


class HttpLogin(Protocol):
    """One keep-alive HTTP/1.1 connection to the router, one request at a time.

    It knows exactly enough HTTP for the router's answers (a status line, headers
    with Content-Length, a JSON body), which keeps a login's cost on this side a few
    tens of microseconds instead of the hundreds an HTTP library takes.
    """

    def __init__(self, host: str) -> None:
        self._host = host.encode()
        self._buffer = b""
        self._waiting: Deferred[tuple[int, dict[str, Any]]] | None = None
        self.connected_ok = False

    def connectionMade(self) -> None:
        self.connected_ok = True
        transport: Any = self.transport  # zope interfaces are opaque to mypy
        transport.setTcpNoDelay(True)

    def login(self, user: str, password: str, device: str) -> Deferred[tuple[int, dict[str, Any]]]:
        if self._waiting is not None:
            raise RuntimeError("one request at a time")
        body = json.dumps({"user": user, "password": password, "device": device}).encode()
        self.transport.write(  # type: ignore[union-attr]
            b"POST /api/v1/login HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (self._host, len(body), body)
        )
        self._waiting = Deferred()
        return self._waiting

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiting is None:
            return
        head = self._buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self._buffer) < end + 4 + length:
            return
        body = self._buffer[end + 4 : end + 4 + length]
        self._buffer = self._buffer[end + 4 + length :]
        status = int(head[0].split()[1])
        waiting, self._waiting = self._waiting, None
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = {}
        waiting.callback((status, payload if isinstance(payload, dict) else {}))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected_ok = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(BenchError("router connection lost"))


# ----------------------------------------------------------------------- IM clients


class BenchConnection(FrameProtocol):
    """One logged-in IM connection, as lean as the protocol allows.

    It reuses the node's own framing (``FrameProtocol``) and the client handshake
    (``ClientHandshake``), and replaces only the per-frame dispatch: no protobuf
    parse for frames whose content it does not need, no Deferred per message.
    """

    def __init__(
        self,
        worker: Worker,
        ticket: LoginTicket,
        suite: str,
        resume: Resumption | None = None,
    ) -> None:
        super().__init__(MAX_FRAME)
        self.worker = worker
        self.user = ticket.user
        offered = (suite,) if worker.single_suite else KNOWN_SUITES
        self._handshake: ClientHandshake | None = ClientHandshake(
            ticket.server_key,
            ticket.token,
            DEVICE,
            suite,
            offered,
            int(time.time() * 1000),
            resume=resume,
        )
        self.ready: Deferred[BenchConnection] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.established = False
        self.heartbeat_interval = 30.0
        self.out: list[bytes] = []
        self.last_out = time.monotonic()
        self._msg_head = b""
        # Like the client library: sequence numbers never repeat for a user and device,
        # even across reconnects, or the node takes a new message for a retry of an
        # old one (and answers it without delivering it again).
        self.next_seq = time.time_ns() // 1000
        self.pending: dict[int, int] = {}
        """client_seq -> send time (monotonic ns) of every unanswered msg:R."""
        self.window = 0
        self.budget = -1
        """msg:R this connection may still send (a fixed-count fill); -1: no limit."""
        self.sent = 0
        self.delivered = 0
        self.accepted = 0
        self.stored = 0
        self.failed = 0
        self.received = 0
        self.acks_answered = 0
        """msg:N covered by the ack:R that ack:A answered."""
        self._acks_waiting: deque[int] = deque()
        """Per ack:R sent and not yet answered, how many msg:N it stands for."""
        self.owed: dict[str, list[int]] = {}
        """Group conversation -> [newest msg id, highest seq, msg:N not yet acknowledged]."""
        self.heartbeats_sent = 0
        self.heartbeats_received = 0
        self.drained: Deferred[None] | None = None
        self._answers: dict[int, list[Deferred[bytes]]] = {}
        self._direct = False

    # --- lifecycle --------------------------------------------------------------------

    def connectionMade(self) -> None:
        # Over the WebSocket gateway the transport is a MessageTransport (one message
        # per frame, cim.protocols.websocket): no socket of ours to write to.
        self._direct = isinstance(self.transport, tcp.Connection)
        if self._direct:
            self.tcp.setTcpNoDelay(True)
        assert self._handshake is not None
        self.send_plaintext(self._handshake.hello_body())

    def plaintext_frame_received(self, body: bytes) -> None:
        handshake, self._handshake = self._handshake, None
        if handshake is None or self.established:
            self.frame_rejected("unexpected plaintext")
            return
        try:
            sealer, opener, first = handshake.finish(body)
        except HandshakeRefused as refusal:
            self._fail_start(f"handshake refused: {refusal.reason_name}")
            return
        except Exception:
            self._fail_start("handshake reply did not authenticate")
            return
        self.start_encryption(sealer, opener)
        result = cim_pb2.LoginResult.FromString(first[1:])
        if result.status != _LOGIN_RESULT_OK:
            self._fail_start(
                "login refused: " + cim_pb2.LoginResult.Status.Name(result.status).lower()
            )
            return
        self.heartbeat_interval = result.heartbeat_interval_ms / 1000 or 30.0
        # The ticket for the next connection of this user ([im] resume_window).
        resumption = handshake.resumption_after(result, time.time())
        if resumption is not None:
            self.worker.resumptions[self.user] = resumption
        self.established = True
        self.worker.live.add(self)
        self.ready.callback(self)

    def _fail_start(self, why: str) -> None:
        self.tcp.loseConnection()
        if not self.ready.called:
            self.ready.errback(BenchError(why))

    def connectionLost(self, reason: Failure | None = None) -> None:
        worker = self.worker
        worker.live.discard(self)
        if self.pending:
            lost = len(self.pending)
            self.failed += lost
            worker.failure_reasons["connection closed before ack:N"] += lost
            self.pending.clear()
        self.established = False
        self.owed.clear()  # never acknowledged: past the cursor, for the next catch-up
        self._acks_waiting.clear()
        worker.retire(self)
        if not self.ready.called:
            self.ready.errback(BenchError("connection closed during the handshake"))
        answers, self._answers = self._answers, {}
        for waiting in answers.values():
            for d in waiting:
                d.errback(BenchError("connection closed before the answer"))
        self._check_drained()
        self.closed.callback(None)

    # --- receiving --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.out:
            self.flush()

    def heartbeat_received(self) -> None:
        self.heartbeats_received += 1

    def dispatch_plaintext(self, plaintext: bytes) -> None:
        kind = plaintext[0]
        if kind == _MSG_A:
            return  # the id is not needed: ack:N names the client_seq
        if kind == _MSG_N:
            self._message_arrived(plaintext)
        elif kind == _ACK_N:
            self._outcome_arrived(plaintext)
        elif kind == _ACK_A:
            # The node saw this client's ack:R, and with it the msg:N it stood for.
            covered = self._acks_waiting
            self.acks_answered += covered.popleft() if covered else 1
        elif kind == _ERROR:
            self._request_refused(plaintext)
        elif kind in _ANSWERS:
            waiting = self._answers.get(kind)
            if waiting:
                waiting.pop(0).callback(plaintext)
            else:
                self.frame_rejected("unexpected answer", f"type {kind}")
        elif kind == _OFFLINE_NOTICE:
            return  # only a pull in progress cares, and it asks until the store is empty
        elif kind in (_KICKED, _GOING_AWAY):
            self.worker.failure_reasons[f"frame type {kind} from the node"] += 1
        else:
            self.frame_rejected("unexpected frame type", f"type {kind}")

    def _message_arrived(self, plaintext: bytes) -> None:
        message = _Message.FromString(plaintext[1:])
        self.received += 1
        latencies = self.worker.latencies
        if latencies is not None:
            sent_ns = int(message.text[:_STAMP_DIGITS])
            latencies.append((_monotonic_ns() - sent_ns) // 1000)
        if message.group:
            # Cumulative: one ack:R per GROUP_ACK_EVERY, the rest by the worker's sweep.
            owed = self.owed.get(message.conversation)
            if owed is None:
                owed = self.owed[message.conversation] = [message.id, message.seq, 1]
            else:
                owed[0] = message.id
                owed[1] = max(owed[1], message.seq)
                owed[2] += 1
            if owed[2] >= GROUP_ACK_EVERY:
                del self.owed[message.conversation]
                self.queue_group_ack(message.conversation, owed)
            return
        body = self._sealer.seal(_ACK_R_HEAD + varint(message.id))
        self.out.append(_length_prefix(len(body)) + body)
        self._acks_waiting.append(1)

    def queue_group_ack(self, conversation: str, owed: list[int]) -> None:
        """ack:R for ``owed[2]`` messages of a group conversation, up to seq ``owed[1]``."""
        ack = cim_pb2.AckR(msg_id=owed[0], conversation=conversation, through_seq=owed[1])
        body = self._sealer.seal(bytes((_ACK_R,)) + ack.SerializeToString())
        self.out.append(_length_prefix(len(body)) + body)
        self._acks_waiting.append(owed[2])

    def flush_group_acks(self) -> None:
        """The worker's sweep: every group ack owed goes now."""
        owed, self.owed = self.owed, {}
        for conversation, entry in owed.items():
            self.queue_group_ack(conversation, entry)
        if self.out:
            self.flush()

    def _outcome_arrived(self, plaintext: bytes) -> None:
        outcome = _AckN.FromString(plaintext[1:])
        if self.pending.pop(outcome.client_seq, None) is None:
            self.worker.failure_reasons["ack:N for an unknown client_seq"] += 1
            return
        status = outcome.status
        if status == _DELIVERED:
            self.delivered += 1
        elif status == _ACCEPTED:
            self.accepted += 1  # a group message: the node took it and fans it out
        elif status == _STORED:
            self.stored += 1  # the receiver is offline: kept for its next pull
        else:
            self.failed += 1
            self.worker.failure_reasons[outcome.reason or "failed"] += 1
        self._answered()

    def _request_refused(self, plaintext: bytes) -> None:
        error = _Error.FromString(plaintext[1:])
        if self.pending.pop(error.client_seq, None) is not None:
            self.failed += 1
            self.worker.failure_reasons[f"ERROR: {error.message}"] += 1
            self._answered()

    def _answered(self) -> None:
        """A msg:R has its answer (ack:N or a refusal): a window sender sends the next
        (a refusal answers as much as an ack:N does; before, a refused sender's window
        emptied and it sent nothing more for the rest of the load)."""
        if self.window and self.worker.loading and self.budget:
            self.queue_message(_monotonic_ns())
        elif not self.pending:
            self._check_drained()

    # --- sending ----------------------------------------------------------------------

    def aim_at(self, peer: str, group: bool = False) -> None:
        """Every msg:R from now on goes to ``peer`` (a user, or a group id with
        ``group``): only the timestamp and seq vary."""
        to = peer.encode()
        tag = _GROUP_TAG if group else _TO_TAG
        self._msg_head = bytes((_MSG_R,)) + tag + varint(len(to)) + to + _TEXT_TAG

    def queue_message(self, now_ns: int) -> None:
        seq = self.next_seq
        self.next_seq = seq + 1
        self.budget -= 1  # from -1 it never reaches 0: no limit
        plaintext = b"%s%020d%s%s%s" % (self._msg_head, now_ns, _PADDING, _SEQ_TAG, varint(seq))
        body = self._sealer.seal(plaintext)
        self.out.append(_length_prefix(len(body)) + body)
        self.pending[seq] = now_ns
        self.sent += 1

    def flush(self) -> None:
        out = self.out
        transport: Any = self.transport
        if transport is not None and self.established:
            data = b"".join(out)
            self.last_out = time.monotonic()
            if not self._direct or transport.dataBuffer or transport._tempDataBuffer:
                transport.write(data)
            else:
                send_now(transport, data)
        out.clear()

    def request(self, frame_type: int, body: bytes, answer_type: int) -> Deferred[bytes]:
        """Send one request frame now; fires with the plaintext of its answer.

        For the few requests outside the message flow (GROUP_R, OFFLINE_R,
        OFFLINE_ACK_R); ``body`` is the serialized request.
        """
        waiter: Deferred[bytes] = Deferred()
        self._answers.setdefault(answer_type, []).append(waiter)
        sealed = self._sealer.seal(bytes((frame_type,)) + body)
        self.out.append(_length_prefix(len(sealed)) + sealed)
        self.flush()
        return waiter

    def send_heartbeat_frame(self) -> None:
        self.transport.write(HEARTBEAT_FRAME)  # type: ignore[union-attr]
        self.heartbeats_sent += 1
        self.last_out = time.monotonic()

    def until_drained(self) -> Deferred[None]:
        """Fires once every msg:R sent so far has its outcome."""
        if not self.pending:
            return _succeeded()
        self.drained = Deferred()
        return self.drained

    def _check_drained(self) -> None:
        if not self.pending and self.drained is not None:
            drained, self.drained = self.drained, None
            drained.callback(None)

    def give_up_pending(self, why: str) -> None:
        """Count what is still unanswered as failed (the drain deadline passed)."""
        if self.pending:
            lost = len(self.pending)
            self.failed += lost
            self.worker.failure_reasons[why] += lost
            self.pending.clear()
        self._check_drained()


def send_now(transport: Any, data: bytes) -> None:
    """Send on the socket at once when nothing is queued, else leave it to Twisted.

    ``transport.write`` only queues: the bytes leave on the next reactor turn, after
    an ``epoll_ctl`` to watch for writability and before another to stop watching.
    At low rates that is two system calls and a loop turn per frame, which made the
    generator cost as much CPU per message as the daemon and added its queueing to
    the measured latency. Anything the socket does not take goes the normal way.
    """
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        sent = 0  # Twisted's own write path notices the broken connection
    if sent < len(data):
        transport.write(data[sent:])


def _succeeded() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.callback(None)
    return d


def with_timeout(d: Deferred[T], seconds: float) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


class Totals:
    """Message counts; a closed connection's counts are folded in here and dropped."""

    __slots__ = (
        "accepted",
        "acks_answered",
        "delivered",
        "failed",
        "heartbeats_received",
        "heartbeats_sent",
        "received",
        "sent",
        "stored",
    )

    def __init__(self) -> None:
        self.sent = self.delivered = self.failed = self.received = 0
        self.accepted = self.stored = self.acks_answered = 0
        self.heartbeats_sent = self.heartbeats_received = 0

    def add(self, conn: BenchConnection | Totals) -> None:
        self.sent += conn.sent
        self.delivered += conn.delivered
        self.accepted += conn.accepted
        self.stored += conn.stored
        self.failed += conn.failed
        self.received += conn.received
        self.acks_answered += conn.acks_answered
        self.heartbeats_sent += conn.heartbeats_sent
        self.heartbeats_received += conn.heartbeats_received

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def minus(self, earlier: dict[str, int]) -> dict[str, int]:
        return {name: getattr(self, name) - earlier.get(name, 0) for name in self.__slots__}
