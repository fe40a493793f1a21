"""The load-generator worker: one process, many clients, driven by JSON lines on stdin.

Run as ``python -m bench.loadgen`` (``bench.run`` starts several, pinned to the core
the daemon does not use). Each command is one JSON object on a line; each answer is
one JSON object on a line of stdout. Nothing else is ever written to stdout.

The clients speak the real protocol (router login over HTTP, the RSA handshake,
sealed frames, the six packets, heartbeats), but as little else as possible, so that
the daemon and not this process is the side that runs out of CPU:

- frames a client does not need to read are opened (they must be: the frame
  counters and the RC4 keystream move on) but not parsed;
- a msg:R is a precomputed prefix plus a send timestamp and a sequence number, and
  an ack:R is two bytes plus a varint, so neither goes through protobuf;
- everything a connection has to send in reaction to one read is sealed into a list
  and written with one ``transport.write`` at the end of that read;
- heartbeats come from one sweep per worker per second, not a timer per connection;
- group messages are acknowledged cumulatively, as the client library does
  (``cim.client.acks``): one ack:R per conversation for every ``GROUP_ACK_EVERY``
  messages, the rest by a sweep per worker every ``GROUP_ACK_DELAY``; 1:1 messages
  are acknowledged one by one, at once;
- the router login uses a bare HTTP/1.1 keep-alive connection, not an HTTP library.

Counting is exact, whatever happens: every msg:R sent ends counted once, as
delivered (ack:N DELIVERED), accepted (ack:N ACCEPTED: a group message the node took
to fan out), stored (ack:N STORED: kept for an offline receiver) or failed (ack:N
FAILED, an ERROR frame, the connection closing with it unanswered, or still
unanswered at the drain deadline). So ``sent == delivered + accepted + stored +
failed`` always holds after a drain; ``tests/{unit,integration}/test_bench.py`` checks it. Receivers
count every msg:N they get (1:1 or group) and, per ack:A, the msg:N its ack:R stood for
(``acks_answered``: every msg:N acknowledged once the counts are equal).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet import tcp
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from cim.client.acks import GROUP_ACK_DELAY, GROUP_ACK_EVERY
from cim.client.router import LoginTicket, NodeTarget, RouterError, parse_ticket
from cim.config import KNOWN_SUITES
from cim.protocols import cim_pb2
from cim.protocols.handshake import ClientHandshake, HandshakeRefused, Resumption
from cim.protocols.wire import HEARTBEAT_FRAME, FrameProtocol

reactor: Any = _reactor
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


def _timeout(d: Deferred[T], seconds: float) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


# --------------------------------------------------------------------------- worker


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


class Worker:
    """All the clients of one process and the commands that drive them."""

    def __init__(self, router: str, im_override: tuple[str, int] | None = None) -> None:
        host, _, port = router.removeprefix("http://").partition(":")
        self.router_host = host
        self.router_port = int(port or 80)
        self.im_override = im_override
        self.single_suite = True
        self.transport = "tcp"
        """tcp, or websocket: the node's gateway (the login's ws_url), as a browser."""
        self.tickets: dict[str, LoginTicket] = {}
        self.resumptions: dict[str, Resumption] = {}
        """Each user's resumption ticket from its last connection (``connect`` with
        ``resume`` uses them)."""
        self.conns: list[BenchConnection] = []
        self.live: set[BenchConnection] = set()
        self.retired = Totals()
        self.failure_reasons: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[int] | None = None
        self.loading = False
        self._senders: list[BenchConnection] = []
        self._pacer: LoopingCall | None = None
        self._mark: dict[str, Any] = {}
        self._heartbeats = LoopingCall(self._heartbeat_sweep)
        self._heartbeats.clock = reactor
        self._group_acks = LoopingCall(self._group_ack_sweep)
        self._group_acks.clock = reactor

    # --- bookkeeping ------------------------------------------------------------------

    def retire(self, conn: BenchConnection) -> None:
        self.retired.add(conn)
        conn.sent = conn.delivered = conn.failed = conn.received = 0
        conn.accepted = conn.stored = conn.acks_answered = 0
        conn.heartbeats_sent = conn.heartbeats_received = 0

    def totals(self) -> Totals:
        totals = Totals()
        totals.add(self.retired)
        for conn in self.live:
            totals.add(conn)
        return totals

    def _heartbeat_sweep(self) -> None:
        now = time.monotonic()
        for conn in self.live:
            if now - conn.last_out >= conn.heartbeat_interval:
                conn.send_heartbeat_frame()

    def _group_ack_sweep(self) -> None:
        for conn in self.live:
            if conn.owed:
                conn.flush_group_acks()

    def start_heartbeats(self) -> None:
        if not self._heartbeats.running:
            self._heartbeats.start(1.0, now=False)
        if not self._group_acks.running:
            self._group_acks.start(GROUP_ACK_DELAY, now=False)

    # --- router -----------------------------------------------------------------------

    async def _router_connection(self) -> HttpLogin:
        endpoint = TCP4ClientEndpoint(reactor, self.router_host, self.router_port, timeout=10)
        protocol = HttpLogin(f"{self.router_host}:{self.router_port}")
        await _timeout(connectProtocol(endpoint, protocol), 15)
        return protocol

    async def login_one(
        self, http: HttpLogin | None, user: str, password: str
    ) -> tuple[HttpLogin, LoginTicket]:
        """Log ``user`` in through the router, reconnecting once if keep-alive broke."""
        for attempt in range(2):
            if http is None or not http.connected_ok:
                http = await self._router_connection()
            try:
                status, body = await _timeout(http.login(user, password, DEVICE), 60)
            except BenchError:
                if attempt:
                    raise
                http = None
                continue
            if status != 200:
                raise BenchError(f"router answered {status} {body.get('error', '')}".strip())
            try:
                ticket = parse_ticket(body)
            except RouterError as error:
                raise BenchError(error.code) from None
            if self.im_override is not None:
                # A node listening on 0.0.0.0 may advertise a name this host cannot use.
                host, port = self.im_override
                ticket = dataclasses.replace(
                    ticket, node=NodeTarget(ticket.node.node_id, host, port)
                )
            return http, ticket
        raise BenchError("router unreachable")

    async def cmd_login(self, spec: dict[str, Any]) -> dict[str, Any]:
        names = _names(spec)
        password = str(spec["password"])
        started = time.monotonic()
        ok = 0
        todo = iter(names)

        async def slot() -> None:
            nonlocal ok
            http: HttpLogin | None = None
            for user in todo:
                try:
                    http, ticket = await self.login_one(http, user, password)
                except Exception as exc:
                    self.errors[f"login: {_label(exc)}"] += 1
                    http = None
                    continue
                self.tickets[user] = ticket
                ok += 1
            if http is not None and http.transport is not None:
                http.transport.loseConnection()

        await _gather(slot() for _ in range(int(spec.get("concurrency", 8))))
        return {"logged_in": ok, "failed": len(names) - ok, "seconds": time.monotonic() - started}

    # --- IM connections ---------------------------------------------------------------

    async def open(
        self,
        ticket: LoginTicket,
        suite: str,
        timeout: float = 30.0,
        resume: Resumption | None = None,
    ) -> BenchConnection:
        conn = BenchConnection(self, ticket, suite, resume)
        if self.transport == "websocket":
            from cim.client.websocket import connect_websocket

            await _timeout(connect_websocket(reactor, ticket.node.ws_url, conn), timeout)
        else:
            endpoint = TCP4ClientEndpoint(reactor, ticket.node.host, ticket.node.port, timeout=10)
            await _timeout(connectProtocol(endpoint, conn), timeout)
        await _timeout(conn.ready, timeout)
        return conn

    async def cmd_connect(self, spec: dict[str, Any]) -> dict[str, Any]:
        names = _names(spec)
        suite = str(spec.get("suite", KNOWN_SUITES[0]))
        self.single_suite = bool(spec.get("single_suite", True))
        self.transport = str(spec.get("transport", "tcp"))
        # resume: each user comes back with the ticket of its last connection (no RSA).
        resume = bool(spec.get("resume", False))
        started = time.monotonic()
        opened: dict[str, BenchConnection] = {}
        todo = iter(names)

        async def slot() -> None:
            for user in todo:
                ticket = self.tickets.get(user)
                if ticket is None:
                    self.errors["connect: not logged in"] += 1
                    continue
                resumption = self.resumptions.pop(user, None) if resume else None
                if resume and resumption is None:
                    self.errors["connect: no resumption ticket"] += 1
                    continue
                try:
                    opened[user] = await self.open(ticket, suite, resume=resumption)
                except Exception as exc:
                    self.errors[f"connect: {_label(exc)}"] += 1

        await _gather(slot() for _ in range(int(spec.get("concurrency", 16))))
        seconds = time.monotonic() - started
        # Keep the order of the names, so pairs are the same whatever finished first.
        self.conns = [opened[user] for user in names if user in opened]
        self.start_heartbeats()
        return {
            "connected": len(self.conns),
            "failed": len(names) - len(self.conns),
            "seconds": seconds,
            "errors": dict(self.errors),
        }

    async def cmd_close(self, spec: dict[str, Any]) -> dict[str, Any]:
        conns = list(self.live)
        waits = [conn.closed for conn in conns]
        for conn in conns:
            if conn.transport is not None:
                conn.transport.loseConnection()
        await _gather_deferreds(waits, float(spec.get("timeout", 30)))
        self.conns = []
        return {"closed": len(conns), "still_open": len(self.live)}

    # --- 1:1 load ---------------------------------------------------------------------

    def _pair_up(self, redirect: dict[str, str]) -> list[BenchConnection]:
        """Connections 0-1, 2-3, ... are pairs; the even one sends to the odd one.

        ``redirect`` sends some senders' messages elsewhere (a user who is offline or
        does not exist), so a test can see failures being counted.
        """
        senders = []
        for index in range(0, len(self.conns) - 1, 2):
            sender, receiver = self.conns[index], self.conns[index + 1]
            sender.aim_at(redirect.get(sender.user, receiver.user))
            senders.append(sender)
        return senders

    async def cmd_load(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start sending; the answer comes at once, the load runs until stop_load.

        ``window``: each sender keeps that many msg:R unanswered and sends the next on
        each ack:N. ``rate``: this worker's senders together send that many per
        second, paced every millisecond, each sender capped at ``max_in_flight``.
        """
        group = spec.get("group")
        if group:
            # The first ``senders`` connections post to the group; every connection
            # (senders included) is a member and receives the others' messages.
            self._senders = self.conns[: int(spec.get("senders", 1))]
            for sender in self._senders:
                sender.aim_at(str(group), group=True)
        else:
            self._senders = self._pair_up(dict(spec.get("redirect", {})))
        if not self._senders:
            raise BenchError("no pairs connected")
        self.loading = True
        if "rate" in spec:
            self._start_pacer(float(spec["rate"]), int(spec.get("max_in_flight", 1000)))
        else:
            window = int(spec["window"])
            now = _monotonic_ns()
            for sender in self._senders:
                sender.window = window
                for _ in range(window):
                    sender.queue_message(now)
                sender.flush()
        return {"senders": len(self._senders)}

    def _start_pacer(self, rate: float, max_in_flight: int) -> None:
        senders = self._senders
        started = time.monotonic()
        sent = 0
        turn = 0

        def tick() -> None:
            nonlocal sent, turn
            due = int(rate * (time.monotonic() - started)) - sent
            if due <= 0:
                return
            now = _monotonic_ns()
            touched = set()
            count = len(senders)
            for _ in range(due):
                sender = senders[turn]
                turn = (turn + 1) % count
                if len(sender.pending) >= max_in_flight:
                    self.errors["rate: sender at max_in_flight, message skipped"] += 1
                    continue
                sender.queue_message(now)
                touched.add(sender)
            sent += due
            for sender in touched:
                sender.flush()

        self._pacer = LoopingCall(tick)
        self._pacer.clock = reactor
        self._pacer.start(0.001, now=True)

    def cmd_mark(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start a measured interval: counts and latencies from here on."""
        self._mark = {"at": time.monotonic(), "totals": self.totals().as_dict()}
        self.latencies = [] if spec.get("latency") else None
        return {}

    def cmd_report(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Counts since the mark, and the latency samples (µs) if they were recorded."""
        delta = self.totals().minus(self._mark.get("totals", {}))
        latencies, self.latencies = self.latencies, None
        return {
            "seconds": time.monotonic() - self._mark.get("at", time.monotonic()),
            "counts": delta,
            "latencies_us": latencies if latencies is not None else [],
        }

    async def cmd_stop_load(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Stop sending, wait (bounded) for every outcome, then give the exact totals."""
        self.loading = False
        if self._pacer is not None and self._pacer.running:
            self._pacer.stop()
        self._pacer = None
        for sender in self._senders:
            sender.window = 0
        waits = [sender.until_drained() for sender in self._senders]
        drained = await _gather_deferreds(waits, float(spec.get("timeout", 30)))
        for sender in self._senders:
            sender.give_up_pending("unanswered at the drain deadline")
        return {"drained": drained, **self._exact_totals()}

    def _exact_totals(self) -> dict[str, Any]:
        totals = self.totals().as_dict()
        return {
            "totals": totals,
            "failure_reasons": dict(self.failure_reasons),
            "errors": dict(self.errors),
        }

    def cmd_totals(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._exact_totals()

    # --- groups -----------------------------------------------------------------------

    async def cmd_group_create(self, spec: dict[str, Any]) -> dict[str, Any]:
        """This worker's first connection creates a group of the named users.

        Over the protocol, as a real client does it (one GROUP_R create naming the
        members; the creator becomes the owner), so the daemon's own checks run and
        the rows are whatever the daemon writes. Members who are not the creator's
        contacts are invited (docs/privacy.md): those connected here accept, as their
        clients would. Answers with the group's id.
        """
        if not self.conns:
            raise BenchError("group_create needs a connected creator")
        creator = self.conns[0]
        request = cim_pb2.GroupRequest(
            request_id=1,
            create=cim_pb2.CreateGroup(name=str(spec.get("name", "bench")), members=_names(spec)),
        )
        plaintext = await _timeout(
            creator.request(_GROUP_R, request.SerializeToString(), _GROUP_A), 60
        )
        answer = cim_pb2.GroupAnswer.FromString(plaintext[1:])
        if not answer.ok:
            raise BenchError(f"group create refused: {answer.error}: {answer.message}")
        invited = list(answer.invited)
        joined = await self._accept_invitations(answer.group.id, invited)
        return {
            "group": answer.group.id,
            "member_count": max(answer.group.member_count, joined),
            "creator": creator.user,
            "invited": invited,
        }

    async def cmd_group_join(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The invited members connected to this worker accept (``group_create`` ran on
        another worker): answers with the member count the last acceptance saw."""
        joined = await self._accept_invitations(str(spec["group"]), list(spec["invited"]))
        return {"member_count": joined}

    async def _accept_invitations(self, group: str, invited: list[str]) -> int:
        """Each of ``invited`` connected here accepts, as its client would; returns the
        member count after the last acceptance (0 if none was made here)."""
        names = set(invited)
        member_count = 0
        for conn in self.conns:
            if conn.user not in names:
                continue
            accept = cim_pb2.GroupRequest(request_id=2, accept=cim_pb2.GroupRef(group=group))
            plaintext = await _timeout(
                conn.request(_GROUP_R, accept.SerializeToString(), _GROUP_A), 60
            )
            joined = cim_pb2.GroupAnswer.FromString(plaintext[1:])
            if not joined.ok:
                raise BenchError(f"{conn.user} could not join: {joined.error}: {joined.message}")
            member_count = joined.group.member_count
        return member_count

    # --- offline messages ---------------------------------------------------------------

    async def cmd_fill(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Exactly ``count`` msg:R to ``to`` from this worker's connections, then wait.

        Each connection keeps ``window`` unanswered and sends the next on each ack:N
        until its share is sent; the answer comes once every outcome is in (or the
        deadline passed: what is left is counted as failed). For an offline ``to``,
        each ack:N STORED means the daemon has the message in its store (or, with
        RabbitMQ, in the offline queue on its way there).
        """
        senders = list(self.conns)
        if not senders:
            raise BenchError("fill needs connected senders")
        to = str(spec["to"])
        count = int(spec["count"])
        window = max(1, int(spec.get("window", 8)))
        before = self.totals().as_dict()
        started = time.monotonic()
        self._senders = senders
        self.loading = True
        now = _monotonic_ns()
        base, extra = divmod(count, len(senders))
        for index, sender in enumerate(senders):
            share = base + (1 if index < extra else 0)
            sender.aim_at(to)
            sender.window = window
            sender.budget = share
            for _ in range(min(window, share)):
                sender.queue_message(now)
            sender.flush()
        waits = [sender.until_drained() for sender in senders]
        drained = await _gather_deferreds(waits, float(spec.get("timeout", 300)))
        self.loading = False
        for sender in senders:
            sender.window = 0
            sender.budget = -1
            sender.give_up_pending("unanswered at the fill deadline")
        return {
            "drained": drained,
            "seconds": time.monotonic() - started,
            "counts": self.totals().minus(before),
            **self._exact_totals(),
        }

    async def cmd_offline_pull(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Log ``user`` in and pull every stored message the way the client library does.

        Router login, handshake, then OFFLINE_R pages newest first (``before`` = the
        previous page's ``next_before``) until ``more`` is false; then, oldest first,
        OFFLINE_ACK_R in chunks of ``ack_chunk`` ids, each answered by OFFLINE_ACK_A
        with how many the store deleted (``cim.client.session``: ``_pull`` and
        ``_flush_offline_acks``). Every page is parsed in full, as the client's is.
        After the timed part, one more OFFLINE_R checks that nothing is left.
        """
        user = str(spec["user"])
        suite = str(spec.get("suite", KNOWN_SUITES[0]))
        limit = int(spec.get("limit", 0))
        ack_chunk = int(spec.get("ack_chunk", 1000))
        max_pages = int(spec.get("max_pages", 100_000))
        started = time.monotonic()
        http, ticket = await self.login_one(None, user, str(spec["password"]))
        if http.transport is not None:
            http.transport.loseConnection()
        logged_in = time.monotonic()
        conn = await self.open(ticket, suite)
        connected = time.monotonic()
        ids: list[int] = []
        senders: Counter[str] = Counter()
        marks: dict[str, int] = {}
        pages = 0
        before = 0
        while True:
            ask = cim_pb2.OfflineR(before=before, limit=limit).SerializeToString()
            plaintext = await _timeout(conn.request(_OFFLINE_R, ask, _OFFLINE_A), 60)
            page = cim_pb2.OfflineA.FromString(plaintext[1:])
            pages += 1
            for message in page.messages:
                ids.append(message.id)
                senders[getattr(message, "from")] += 1
                marks[message.conversation] = max(marks.get(message.conversation, 0), message.seq)
            if not page.more:
                break
            if pages >= max_pages:
                raise BenchError(f"still more after {pages} pages")
            before = page.next_before
        pulled = time.monotonic()
        oldest_first = sorted(set(ids))
        # Timelines (#14): acknowledging is moving a cursor per conversation.
        cursors = [cim_pb2.Cursor(conversation=c, seq=s) for c, s in sorted(marks.items())]
        waits = [
            conn.request(
                _OFFLINE_ACK_R,
                cim_pb2.OfflineAckR(cursors=cursors[i : i + ack_chunk]).SerializeToString(),
                _OFFLINE_ACK_A,
            )
            for i in range(0, len(cursors), ack_chunk)
        ]
        acknowledged = 0
        for waiting in waits:
            answer = await _timeout(waiting, 60)
            acknowledged += cim_pb2.OfflineAckA.FromString(answer[1:]).acknowledged
        done = time.monotonic()
        check = cim_pb2.OfflineR().SerializeToString()
        left = cim_pb2.OfflineA.FromString(
            (await _timeout(conn.request(_OFFLINE_R, check, _OFFLINE_A), 60))[1:]
        )
        return {
            "pulled": len(ids),
            "unique": len(oldest_first),
            "pages": pages,
            "acknowledged": acknowledged,
            "left_after": len(left.messages),
            "senders": dict(senders),
            "login_seconds": logged_in - started,
            "handshake_seconds": connected - logged_in,
            "pull_seconds": pulled - connected,
            "ack_seconds": done - pulled,
            "seconds": done - started,
        }

    # --- churn ------------------------------------------------------------------------

    async def cmd_churn(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``cycles`` times: router login, handshake, ``messages`` to the sink, close.

        The sink is this worker's first connection (from ``connect``); each
        concurrent churner uses its own user, so every login replaces the previous
        session of that user, as a real reconnecting client's would.
        """
        if not self.conns:
            raise BenchError("churn needs a connected sink")
        sink = self.conns[0].user
        users = _names(spec)
        password = str(spec["password"])
        suite = str(spec.get("suite", KNOWN_SUITES[0]))
        messages = int(spec.get("messages", 4))
        remaining = int(spec["cycles"])
        done = 0
        started = time.monotonic()

        async def churner(user: str) -> None:
            nonlocal remaining, done
            http: HttpLogin | None = None
            while remaining > 0:
                remaining -= 1
                try:
                    http, ticket = await self.login_one(http, user, password)
                    conn = await self.open(ticket, suite)
                except Exception as exc:
                    self.errors[f"churn: {_label(exc)}"] += 1
                    http = None
                    continue
                conn.aim_at(sink)
                now = _monotonic_ns()
                for _ in range(messages):
                    conn.queue_message(now)
                conn.flush()
                try:
                    await _timeout(conn.until_drained(), 30)
                except Exception:
                    conn.give_up_pending("unanswered at the churn deadline")
                conn.tcp.loseConnection()
                await conn.closed
                done += 1
            if http is not None and http.transport is not None:
                http.transport.loseConnection()

        await _gather(churner(user) for user in users)
        return {"cycles": done, "seconds": time.monotonic() - started, **self._exact_totals()}


def _names(spec: dict[str, Any]) -> list[str]:
    """User names from a compact spec: ``prefix`` + numbers ``start`` .. ``start+count-1``."""
    prefix = str(spec["prefix"])
    start = int(spec.get("start", 0))
    return [f"{prefix}{number}" for number in range(start, start + int(spec["count"]))]


def _label(exc: BaseException) -> str:
    if isinstance(exc, BenchError):
        return str(exc)
    return type(exc).__name__


async def _gather(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    deferreds = [ensureDeferred(coroutine) for coroutine in coroutines]
    for d in deferreds:
        await d


async def _gather_deferreds(waits: list[Deferred[None]], timeout: float) -> bool:
    """Wait for all, at most ``timeout`` seconds; True if all fired in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.called for d in waits):
            return True
        await deferLater(reactor, 0.01, lambda: None)
    return all(d.called for d in waits)


# ------------------------------------------------------------------- command channel


class Commands(LineReceiver):
    """stdin: one JSON command per line; stdout: one JSON answer per command."""

    delimiter = b"\n"
    MAX_LENGTH = 64 << 20

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def lineReceived(self, line: bytes) -> None:
        if not line.strip():
            return
        command = json.loads(line)
        ensureDeferred(self._run(command))

    async def _run(self, command: dict[str, Any]) -> None:
        name = str(command.get("cmd"))
        answer: dict[str, Any] = {"cmd": name, "id": command.get("id"), "pid": os.getpid()}
        try:
            if name == "init":
                override = command.get("im_override")
                self.worker = Worker(str(command["router"]), tuple(override) if override else None)
                result: dict[str, Any] = {}
            elif name == "exit":
                result = {}
                reactor.callLater(0, reactor.stop)
            else:
                result = await self._dispatch(name, command)
            answer.update(result, ok=True)
        except Exception as exc:
            answer.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        self.transport.write(json.dumps(answer).encode() + b"\n")  # type: ignore[union-attr]

    async def _dispatch(self, name: str, command: dict[str, Any]) -> dict[str, Any]:
        worker = self.worker
        if worker is None:
            raise BenchError("send init first")
        handler: Callable[[dict[str, Any]], Any] | None = getattr(worker, f"cmd_{name}", None)
        if handler is None:
            raise BenchError(f"unknown command {name!r}")
        result = handler(command)
        if isinstance(result, dict):
            return result
        awaited: dict[str, Any] = await result
        return awaited

    def connectionLost(self, reason: Failure | None = None) -> None:
        # The parent went away: nobody is left to read the answers.
        if reactor.running:
            reactor.stop()


def main() -> None:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False,
    )
    StandardIO(Commands())
    reactor.run()


if __name__ == "__main__":
    main()
