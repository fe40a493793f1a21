"""The IM node's domain logic: who is connected here and how a message travels.

It deals in sessions (anything with ``deliver`` and ``kick``), never in sockets, so
the whole message flow is testable without a transport. The wire protocol decodes a
frame, then calls one method here; everything the switchboard says goes back through
``ClientSession.deliver``.

The flow is the design's six packets: msg:R from the sender is answered at once with
msg:A (the node took it and gave it a server id); msg:N goes to the receiver; the
receiver's ack:R is answered with ack:A and the sender is told with ack:N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.interfaces import IStateStore, SessionRecord, StateUnavailable
from cim.message_ids import MessageIdGenerator
from cim.metrics import NodeMetrics
from cim.protocols import cim_pb2

MSG_A = cim_pb2.MSG_A
MSG_N = cim_pb2.MSG_N
ACK_A = cim_pb2.ACK_A
ACK_N = cim_pb2.ACK_N
ONLINE_A = cim_pb2.ONLINE_A
ERROR = cim_pb2.ERROR
DELIVERED = cim_pb2.DELIVERED
FAILED = cim_pb2.FAILED
SYSTEM = cim_pb2.SYSTEM
BAD_REQUEST = cim_pb2.Error.BAD_REQUEST

MAX_TEXT_LENGTH = 16384
MAX_ONLINE_PAGE = 1000
DEFAULT_ONLINE_PAGE = 100

REASON_LOGGED_IN_ELSEWHERE = "logged in elsewhere"
REASON_REPLACED = "replaced by a newer connection of the same session"
_KICK_CODES = {
    REASON_LOGGED_IN_ELSEWHERE: cim_pb2.Kicked.LOGGED_IN_ELSEWHERE,
    REASON_REPLACED: cim_pb2.Kicked.REPLACED,
    "logged out": cim_pb2.Kicked.LOGGED_OUT,
    "expired": cim_pb2.Kicked.SESSION_EXPIRED,
}


def kick_code(reason: str) -> cim_pb2.Kicked.Code:
    """The machine-readable code a client acts on (reconnect or not) for a reason."""
    return _KICK_CODES.get(reason, cim_pb2.Kicked.CODE_UNSPECIFIED)


_MEDIA_TYPES = frozenset((cim_pb2.IMAGE, cim_pb2.VOICE, cim_pb2.FILE))


def message_problem(message: cim_pb2.Message) -> str | None:
    """Why a client's msg:R is refused, or None when it is acceptable."""
    if message.group:
        return "group messages are not supported by this node"
    if not message.to:
        return "a message needs a receiver ('to')"
    if message.type == SYSTEM:
        return "system messages come from the server only"
    if len(message.text) > MAX_TEXT_LENGTH:
        return f"a message text holds at most {MAX_TEXT_LENGTH} characters"
    if message.type in _MEDIA_TYPES and not message.media.url:
        return "an image, voice or file message needs media.url"
    if message.type == cim_pb2.LOCATION and not message.HasField("location"):
        return "a location message needs location"
    return None


class ClientSession(Protocol):
    """What the switchboard needs from an authenticated connection."""

    record: SessionRecord

    def deliver(self, frame_type: int, message: ProtobufMessage) -> None: ...

    def kick(self, reason: str) -> None: ...

    def going_away(self, reason: str, reconnect_after_ms: int) -> None: ...


UserExists = Callable[[str], "Deferred[bool]"]


@dataclass(slots=True)
class _Pending:
    """A msg:N sent and not yet acknowledged by its receiver."""

    sender: str
    client_seq: int
    receiver: str


class Switchboard:
    log = Logger()

    def __init__(
        self,
        node_id: str,
        state: IStateStore,
        user_exists: UserExists,
        clock: IReactorTime,
        metrics: NodeMetrics,
        message_ids: MessageIdGenerator,
    ) -> None:
        self.node_id = node_id
        self._state = state
        self._user_exists = user_exists
        self._clock = clock
        self._metrics = metrics
        self._ids = message_ids
        self._sessions: dict[str, ClientSession] = {}
        self._pending: dict[int, _Pending] = {}
        # receiver -> ids of its unacknowledged msg:N, to settle them when it leaves.
        self._pending_by_receiver: dict[str, set[int]] = {}
        state.add_session_ended_listener(self._session_ended)

    # --- sessions ---------------------------------------------------------------------

    def session_for(self, user: str) -> ClientSession | None:
        return self._sessions.get(user)

    @property
    def connected_count(self) -> int:
        return len(self._sessions)

    def session_opened(self, session: ClientSession) -> None:
        """A connection finished its handshake; an older connection of the user goes.

        The router has already decided duplicate logins (only the newest session's
        token is valid), so an older connection here is either a replaced session
        (kicked as 'logged in elsewhere') or a stale connection of the same session
        that the client abandoned when it reconnected.
        """
        user = session.record.user
        previous = self._sessions.get(user)
        self._sessions[user] = session
        if previous is not None and previous is not session:
            same = previous.record.session_id == session.record.session_id
            previous.kick(REASON_REPLACED if same else REASON_LOGGED_IN_ELSEWHERE)
        self._background(self._state.mark_online(session.record), "mark online")

    def session_closed(self, session: ClientSession) -> None:
        user = session.record.user
        if self._sessions.get(user) is not session:
            return
        del self._sessions[user]
        self._fail_pending_for(user, "the receiver disconnected before acknowledging")
        self._background(self._state.mark_offline(session.record), "mark offline")

    def _session_ended(self, record: SessionRecord, reason: str) -> None:
        """The state store ended a session (login elsewhere, logout): drop its connection."""
        session = self._sessions.get(record.user)
        if session is not None and session.record.session_id == record.session_id:
            session.kick(reason)

    def refresh_routes(self) -> Deferred[None]:
        """Tell the state store this node's users are still here (extends route TTLs).

        Runs periodically; it also rewrites what a restarted state store lost, so
        connected users stay reachable without reconnecting.
        """
        records = [session.record for session in self._sessions.values()]
        d = self._state.refresh_sessions(self.node_id, records)
        # The store already logged the outage once; retrying next period is enough.
        d.addErrback(lambda failure: failure.trap(StateUnavailable))
        d.addErrback(self._log_failure, "refresh routes")
        return d

    def shutdown(self, reason: str, reconnect_after_ms: int) -> None:
        """Tell every client the node is going away; their connections then close."""
        for session in list(self._sessions.values()):
            session.going_away(reason, reconnect_after_ms)

    # --- messages ---------------------------------------------------------------------

    def message_received(self, session: ClientSession, message: cim_pb2.Message) -> None:
        """msg:R. The sender is the connection's user, whatever the frame claims."""
        problem = message_problem(message)
        if problem is not None:
            session.deliver(
                ERROR,
                cim_pb2.Error(
                    code=BAD_REQUEST,
                    message=problem,
                    request_type=cim_pb2.MSG_R,
                    client_seq=message.client_seq,
                ),
            )
            return
        record = session.record
        msg_id = self._ids.next_id()
        sent_at_ms = MessageIdGenerator.timestamp_ms(msg_id)
        message.id = msg_id
        setattr(message, "from", record.user)
        message.device = record.device
        message.sent_at_ms = sent_at_ms
        session.deliver(
            MSG_A, cim_pb2.MsgA(client_seq=message.client_seq, msg_id=msg_id, sent_at_ms=sent_at_ms)
        )
        receiver = self._sessions.get(message.to)
        if receiver is not None:
            self._pending[msg_id] = _Pending(record.user, message.client_seq, message.to)
            self._pending_by_receiver.setdefault(message.to, set()).add(msg_id)
            receiver.deliver(MSG_N, message)
            return
        self._receiver_not_here(record.user, message)

    def _receiver_not_here(self, sender: str, message: cim_pb2.Message) -> None:
        msg_id, client_seq, to = message.id, message.client_seq, message.to

        def decided(exists: bool) -> None:
            reason = "the receiver is offline" if exists else "no such user"
            self._metrics.messages["failed"] += 1
            self._tell_sender(sender, msg_id, client_seq, to, FAILED, reason)

        d = self._user_exists(to)
        d.addCallback(decided)
        d.addErrback(self._log_failure, "look up the receiver")

    def ack_received(self, session: ClientSession, ack: cim_pb2.AckR) -> None:
        """ack:R. Only the message's receiver can acknowledge it."""
        user = session.record.user
        pending = self._pending.get(ack.msg_id)
        session.deliver(ACK_A, cim_pb2.AckA(msg_id=ack.msg_id))
        if pending is None or pending.receiver != user:
            return
        del self._pending[ack.msg_id]
        waiting = self._pending_by_receiver.get(user)
        if waiting is not None:
            waiting.discard(ack.msg_id)
            if not waiting:
                del self._pending_by_receiver[user]
        self._metrics.messages["delivered"] += 1
        self._tell_sender(pending.sender, ack.msg_id, pending.client_seq, user, DELIVERED, "")

    def _fail_pending_for(self, receiver: str, reason: str) -> None:
        for msg_id in self._pending_by_receiver.pop(receiver, ()):
            pending = self._pending.pop(msg_id, None)
            if pending is not None:
                self._metrics.messages["failed"] += 1
                self._tell_sender(
                    pending.sender, msg_id, pending.client_seq, receiver, FAILED, reason
                )

    def _tell_sender(
        self,
        sender: str,
        msg_id: int,
        client_seq: int,
        to: str,
        status: cim_pb2.DeliveryStatus,
        reason: str,
    ) -> None:
        session = self._sessions.get(sender)
        if session is not None:
            session.deliver(
                ACK_N,
                cim_pb2.AckN(
                    msg_id=msg_id, client_seq=client_seq, status=status, reason=reason, to=to
                ),
            )

    # --- presence ---------------------------------------------------------------------

    def online_requested(self, session: ClientSession, request: cim_pb2.OnlineR) -> None:
        limit = min(request.limit or DEFAULT_ONLINE_PAGE, MAX_ONLINE_PAGE)
        d = self._state.online_users(request.offset, limit)

        def answer(page: tuple[int, list[str]]) -> None:
            total, users = page
            session.deliver(ONLINE_A, cim_pb2.OnlineA(total=total, users=users))

        d.addCallback(answer)
        d.addErrback(self._log_failure, "list online users")

    # --- plumbing ---------------------------------------------------------------------

    def _background(self, d: Deferred[None], what: str) -> None:
        d.addErrback(self._log_failure, what)

    def _log_failure(self, failure: Failure, what: str) -> None:
        self.log.failure("could not {what}", failure, what=what)
