"""The IM node's domain logic: who is connected here and how a message travels.

It deals in sessions (anything with ``deliver`` and ``kick``), never in sockets, so
the whole message flow is testable without a transport. The wire protocol decodes a
frame, then calls one method here; everything the switchboard says goes back through
``ClientSession.deliver``.

The flow is the design's six packets: msg:R from the sender is answered at once with
msg:A (the node took it and gave it a server id); msg:N goes to the receiver; the
receiver's ack:R is answered with ack:A and the sender is told with ack:N.

A receiver connected to another node is reached over the bus (its route says which
node); its ack comes back the same way to whichever node the sender is on. Every
msg:R is first claimed in the state store under (sender, device, client sequence), so
a retry, even one arriving on another node or after a restart, gets the same msg:A
and is not delivered as a second message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.interfaces import (
    BusUnavailable,
    IMessageBus,
    IStateBackend,
    MessageReceipt,
    SessionRecord,
    StateUnavailable,
)
from cim.message_ids import MessageIdGenerator
from cim.metrics import NodeMetrics
from cim.protocols import cim_pb2
from cim.storage.offline import OfflineFull

MSG_A = cim_pb2.MSG_A
MSG_N = cim_pb2.MSG_N
ACK_A = cim_pb2.ACK_A
ACK_N = cim_pb2.ACK_N
ONLINE_A = cim_pb2.ONLINE_A
ERROR = cim_pb2.ERROR
DELIVERED = cim_pb2.DELIVERED
FAILED = cim_pb2.FAILED
ACCEPTED = cim_pb2.ACCEPTED
GROUP_A = cim_pb2.GROUP_A
UNAVAILABLE = cim_pb2.Error.UNAVAILABLE
SYSTEM = cim_pb2.SYSTEM
SYSTEM_SENDER = "@system"
"""The sender of server-made messages: no account can have it (names start with a
letter or digit), so a client can trust a message from it came from the server."""
BAD_REQUEST = cim_pb2.Error.BAD_REQUEST

MAX_TEXT_LENGTH = 16384
FANOUT_SLICE = 100
"""Group deliveries made per reactor turn, so a big group does not stall other users."""

REASON_RECEIVER_OFFLINE = "the receiver is offline"
REASON_NO_SUCH_USER = "no such user"
REASON_RECEIVER_LEFT = "the receiver disconnected before acknowledging"
REASON_FORWARD_FAILED = "the receiver's node could not be reached"
REASON_NOT_ACKNOWLEDGED = "the receiver did not acknowledge in time"
REASON_NODE_GONE = "the receiver's node is gone"
REASON_OFFLINE_FULL = "the receiver has too many stored messages"
REASON_NOT_STORED = "the message could not be stored for the receiver"
STORED = cim_pb2.STORED
OFFLINE_A = cim_pb2.OFFLINE_A
OFFLINE_ACK_A = cim_pb2.OFFLINE_ACK_A
OFFLINE_SUMMARY_A = cim_pb2.OFFLINE_SUMMARY_A
OFFLINE_NOTICE = cim_pb2.OFFLINE_NOTICE
HISTORY_A = cim_pb2.HISTORY_A
PENDING_TIMEOUT = 160.0
"""A receiver that holds a msg:N this long without ack:R fails it (the sender's client
gives up at the same point), so a client that never acks cannot grow the node."""
MAX_ONLINE_PAGE = 1000
DEFAULT_ONLINE_PAGE = 100

REASON_LOGGED_IN_ELSEWHERE = "logged in elsewhere"
REASON_REPLACED = "replaced by a newer connection of the same session"
_KICK_CODES = {
    REASON_LOGGED_IN_ELSEWHERE: cim_pb2.Kicked.LOGGED_IN_ELSEWHERE,
    REASON_REPLACED: cim_pb2.Kicked.REPLACED,
    "logged out": cim_pb2.Kicked.LOGGED_OUT,
    "expired": cim_pb2.Kicked.SESSION_EXPIRED,
    "kicked by an administrator": cim_pb2.Kicked.BY_ADMIN,
}


def kick_code(reason: str) -> cim_pb2.Kicked.Code:
    """The machine-readable code a client acts on (reconnect or not) for a reason."""
    return _KICK_CODES.get(reason, cim_pb2.Kicked.CODE_UNSPECIFIED)


_MEDIA_TYPES = frozenset((cim_pb2.IMAGE, cim_pb2.VOICE, cim_pb2.FILE))


def message_problem(message: cim_pb2.Message) -> str | None:
    """Why a client's msg:R is refused, or None when it is acceptable."""
    if message.group and message.to:
        return "a message goes to a user ('to') or a group ('group'), not both"
    if not message.to and not message.group:
        return "a message needs a receiver ('to') or a group ('group')"
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


class OfflineBox(Protocol):
    """What the switchboard needs from offline storage (cim.offline.store.OfflineStore)."""

    def store(self, messages: Iterable[Any], *, capped: bool = True) -> Deferred[int]: ...

    def page(self, receiver: str, before: int | None = None, limit: int = ...) -> Deferred[Any]: ...

    def acknowledge(self, receiver: str, msg_ids: Iterable[int]) -> Deferred[int]: ...

    def summary(self, receiver: str) -> Deferred[list[Any]]: ...


class Archive(Protocol):
    """Takes every message that reached its receiver or the store (cim.history.archive)."""

    def archive(self, message: cim_pb2.Message) -> None: ...


class HistoryAnswers(Protocol):
    def answer(self, user: str, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]: ...


class GroupMembership(Protocol):
    """What the switchboard needs from the group directory (cim.groups.directory)."""

    def is_member(self, group: str, user: str) -> Deferred[bool]: ...

    def member_names(self, group: str) -> Deferred[list[str]]: ...

    def answer(
        self, actor: str, request: cim_pb2.GroupRequest
    ) -> Deferred[cim_pb2.GroupAnswer]: ...


@dataclass(slots=True)
class _Pending:
    """A 1:1 msg:N sent here and not yet acknowledged by its receiver."""

    sender: str
    sender_device: str
    client_seq: int
    receiver: str
    message: cim_pb2.Message
    deadline: float


class Switchboard:
    log = Logger()

    def __init__(
        self,
        node_id: str,
        state: IStateBackend,
        user_exists: UserExists,
        clock: IReactorTime,
        metrics: NodeMetrics,
        message_ids: MessageIdGenerator,
        bus: IMessageBus | None = None,
        groups: GroupMembership | None = None,
        live_nodes: Callable[[], Iterable[str]] | None = None,
        offline: OfflineBox | None = None,
        offline_page_size: int = 100,
        archive: Archive | None = None,
        history: HistoryAnswers | None = None,
    ) -> None:
        self.node_id = node_id
        self._state = state
        self._user_exists = user_exists
        self._clock = clock
        self._metrics = metrics
        self._ids = message_ids
        self._bus = bus
        self._groups = groups
        # Which node ids the registry sees alive; a route to any other is stale.
        self._live_nodes = live_nodes
        self._offline = offline
        self._page_size = offline_page_size
        self._archive = archive
        self._history = history
        self._sessions: dict[str, ClientSession] = {}
        # (msg_id, receiver) -> who to tell when the receiver acknowledges.
        self._pending: dict[tuple[int, str], _Pending] = {}
        # receiver -> its unacknowledged msg ids, to settle them when it leaves.
        self._pending_by_receiver: dict[str, set[int]] = {}
        # Group messages fan out one after another per group, in server-id order.
        self._fanout_queues: dict[str, deque[cim_pb2.Message]] = {}
        state.sessions.add_session_ended_listener(self._session_ended)
        if bus is not None:
            bus.consume(node_id, self.bus_message_received)

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
            # What the old connection held unacknowledged goes to the new one at once
            # (the client drops what it already showed).
            for msg_id in sorted(self._pending_by_receiver.get(user, ())):
                pending = self._pending.get((msg_id, user))
                if pending is not None:
                    session.deliver(MSG_N, pending.message)
        self._background(self._state.presence.mark_online(session.record), "mark online")

    def session_closed(self, session: ClientSession) -> None:
        user = session.record.user
        if self._sessions.get(user) is not session:
            return
        del self._sessions[user]
        self._fail_pending_for(user, REASON_RECEIVER_LEFT)
        self._background(self._state.presence.mark_offline(session.record), "mark offline")

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
        self.expire_pending()
        records = [session.record for session in self._sessions.values()]
        d = self._state.presence.refresh_sessions(self.node_id, records)
        # The store already logged the outage once; retrying next period is enough.
        d.addErrback(lambda failure: failure.trap(StateUnavailable))
        d.addErrback(self._log_failure, "refresh routes")
        return d

    def shutdown(self, reason: str, reconnect_after_ms: int) -> None:
        """Tell every client the node is going away; their connections then close."""
        for session in list(self._sessions.values()):
            session.going_away(reason, reconnect_after_ms)

    # --- messages from clients --------------------------------------------------------

    def message_received(self, session: ClientSession, message: cim_pb2.Message) -> None:
        """msg:R. The sender is the connection's user, whatever the frame claims."""
        problem = message_problem(message)
        if problem is not None:
            self._refuse(session, message.client_seq, BAD_REQUEST, problem)
            return
        record = session.record
        msg_id = self._ids.next_id()
        sent_at_ms = MessageIdGenerator.timestamp_ms(msg_id)
        message.id = msg_id
        setattr(message, "from", record.user)
        message.device = record.device
        message.sent_at_ms = sent_at_ms
        if message.group:
            d = self._check_member(message.group, record.user)
            d.addCallback(self._claim, session, message)
        else:
            d = self._claim(True, session, message)  # the hot path: no extra Deferred
        d.addErrback(self._claim_failed, session, message.client_seq)

    def _check_member(self, group: str, user: str) -> Deferred[bool]:
        if self._groups is None:
            return succeed(False)
        return self._groups.is_member(group, user)

    def _claim(self, member: bool, session: ClientSession, message: cim_pb2.Message) -> Any:
        if not member:
            self._refuse(
                session, message.client_seq, BAD_REQUEST, "only members can post to a group"
            )
            return succeed(None)
        record = session.record
        d = self._state.receipts.remember_message(
            record.user, record.device, message.client_seq, message.id, message.sent_at_ms
        )
        d.addCallback(self._claimed, session, message)
        return d

    def _claimed(
        self, receipt: MessageReceipt | None, session: ClientSession, message: cim_pb2.Message
    ) -> None:
        if receipt is not None:
            # A retry: the same id as the first time, and never a second message.
            message.id = receipt.msg_id
            message.sent_at_ms = receipt.sent_at_ms
        session.deliver(
            MSG_A,
            cim_pb2.MsgA(
                client_seq=message.client_seq, msg_id=message.id, sent_at_ms=message.sent_at_ms
            ),
        )
        if receipt is not None and receipt.status and receipt.status != FAILED:
            # Settled: answer the retry with the same outcome, deliver nothing again.
            # A FAILED one is routed again (a user's resend), under the same id.
            self._tell_sender(
                session.record.user,
                session.record.device,
                cim_pb2.AckN(
                    msg_id=message.id,
                    client_seq=message.client_seq,
                    status=receipt.status,  # type: ignore[arg-type]
                    reason=receipt.reason,
                    to=message.to or message.group,
                ),
            )
            return
        if message.group:
            # First time, or a retry of one never numbered (the state store failed in
            # between): number it and fan out. Members drop a second copy by id.
            if receipt is None or not receipt.status:
                d = self._state.sequences.next_group_seq(message.group)
                d.addCallback(self._numbered, session, message)
                d.addErrback(self._claim_failed, session, message.client_seq)
            return
        # First time, or a retry whose outcome is still open (the node that held it may
        # have died): deliver (again). The receiver's client drops a duplicate by id.
        self._route(message, session.record.device)

    def _claim_failed(self, failure: Failure, session: ClientSession, client_seq: int) -> None:
        if failure.check(StateUnavailable):
            self._refuse(
                session, client_seq, UNAVAILABLE, "the node cannot take messages right now; retry"
            )
            return
        self._log_failure(failure, "take a message")
        self._refuse(session, client_seq, cim_pb2.Error.INTERNAL, "the node failed to take it")

    def _refuse(self, session: ClientSession, client_seq: int, code: Any, text: str) -> None:
        session.deliver(
            ERROR,
            cim_pb2.Error(
                code=code, message=text, request_type=cim_pb2.MSG_R, client_seq=client_seq
            ),
        )

    # --- one-to-one routing -----------------------------------------------------------

    def _route(self, message: cim_pb2.Message, sender_device: str) -> None:
        receiver = message.to
        if receiver in self._sessions:
            self._deliver_here(message, sender_device, receiver)
            return
        if self._bus is None:
            self._receiver_not_here(message, sender_device)
            return
        d = self._state.presence.route(receiver)
        d.addCallback(self._routed, message, sender_device)
        d.addErrback(self._forward_failed, message, sender_device)

    def _routed(self, node: str | None, message: cim_pb2.Message, sender_device: str) -> Any:
        if node is None or node == self.node_id:
            self._receiver_not_here(message, sender_device)
            return None
        if not self._alive(node):
            # Its node died and the route has not expired yet: the receiver is not
            # reachable until it logs in again elsewhere; it finds the message then.
            self._fall_back(message, sender_device, REASON_NODE_GONE)
            return None
        return self._forward(node, message, [message.to], sender_device)

    def _alive(self, node: str) -> bool:
        return self._live_nodes is None or node in set(self._live_nodes())

    def _forward(
        self, node: str, message: cim_pb2.Message, receivers: list[str], sender_device: str
    ) -> Deferred[None]:
        assert self._bus is not None
        envelope = cim_pb2.BusEnvelope(
            origin_node=self.node_id,
            deliver=cim_pb2.BusDelivery(
                message=message, receivers=receivers, sender_device=sender_device
            ),
        )
        self._metrics.messages["forwarded"] += 1
        return self._bus.publish(node, envelope.SerializeToString())

    def _forward_failed(
        self, failure: Failure, message: cim_pb2.Message, sender_device: str
    ) -> None:
        if not failure.check(BusUnavailable, StateUnavailable):
            self._log_failure(failure, "forward a message")
        self.log.warn(
            "could not forward message {id} to {to}: {why}",
            id=message.id,
            to=message.to,
            why=failure.getErrorMessage(),
        )
        self._fall_back(message, sender_device, REASON_FORWARD_FAILED)

    def _deliver_here(self, message: cim_pb2.Message, sender_device: str, receiver: str) -> None:
        key = (message.id, receiver)
        if key in self._pending:
            return  # a retry while the receiver still holds it unacknowledged here
        self._pending[key] = _Pending(
            getattr(message, "from"),
            sender_device,
            message.client_seq,
            receiver,
            message,
            self._clock.seconds() + PENDING_TIMEOUT,
        )
        self._pending_by_receiver.setdefault(receiver, set()).add(message.id)
        self._sessions[receiver].deliver(MSG_N, message)

    def _receiver_not_here(self, message: cim_pb2.Message, sender_device: str) -> None:
        def decided(exists: bool) -> None:
            if not exists:
                self._settle(message, sender_device, FAILED, REASON_NO_SUCH_USER)
            elif self._offline is None:
                self._settle(message, sender_device, FAILED, REASON_RECEIVER_OFFLINE)
            else:
                self._store_offline(message, sender_device)

        def unknown(failure: Failure) -> None:
            # The account lookup failed: the receiver is not here either way.
            self._log_failure(failure, "look up the receiver")
            decided(True)

        d = self._user_exists(message.to)
        d.addCallbacks(decided, unknown)

    def _fall_back(self, message: cim_pb2.Message, sender_device: str, reason: str) -> None:
        """The receiver cannot be reached now: store the message, or fail it explicitly."""
        if self._offline is not None:
            self._store_offline(message, sender_device)
        else:
            self._settle(message, sender_device, FAILED, reason)

    def _store_offline(self, message: cim_pb2.Message, sender_device: str) -> None:
        """Keep it for the receiver's next pull; the sender hears "stored" only after
        the store has it (design: 伪造ack:N)."""
        assert self._offline is not None
        d = self._offline.store([message])

        def stored(_: int) -> None:
            self._settle(message, sender_device, STORED, "")
            self.stored_for([message.to])

        def not_stored(failure: Failure) -> None:
            if failure.check(OfflineFull):
                reason = REASON_OFFLINE_FULL
            else:
                self._log_failure(failure, "store a message offline")
                reason = REASON_NOT_STORED
            self._settle(message, sender_device, FAILED, reason)

        d.addCallbacks(stored, not_stored)

    def send_system(
        self, receivers: Iterable[str], text: str, urgent: bool = False
    ) -> Deferred[list[str]]:
        """A message the server itself sends (the logic service's notices) to users.

        It is stored first and connected receivers are then told to pull, the path an
        offline message takes: a notice is on disk before anyone is told about it, so a
        connection that drops before acknowledging, a node that dies, or a receiver who
        is offline all end the same way, with the notice delivered at the next pull and
        dropped by id if it ever arrives twice. Fires with the receivers it was stored
        for; a receiver whose store is full is logged and left out, the others still
        get it. An ``urgent`` message (an SOS) ignores the cap: a full box of chat must
        not cost anyone an alarm.
        """
        if self._offline is None:
            raise RuntimeError("system messages need offline storage")
        offline = self._offline
        msg_id = self._ids.next_id()
        unique = sorted(set(receivers))

        def copy_for(receiver: str) -> tuple[str, cim_pb2.Message]:
            message = cim_pb2.Message(
                id=msg_id,
                to=receiver,
                type=SYSTEM,
                text=text,
                sent_at_ms=MessageIdGenerator.timestamp_ms(msg_id),
            )
            setattr(message, "from", SYSTEM_SENDER)
            return receiver, message

        async def store() -> list[str]:
            # One batch; the store names the full boxes when it refuses, as for groups.
            stored = unique
            while stored:
                try:
                    await offline.store([copy_for(user) for user in stored], capped=not urgent)
                    break
                except OfflineFull as full:
                    self.log.warn(
                        "system message {id} not stored for {users}: offline store full",
                        id=msg_id,
                        users=", ".join(full.receivers),
                    )
                    rest = [user for user in stored if user not in set(full.receivers)]
                    if len(rest) == len(stored):
                        raise
                    stored = rest
            self._metrics.messages["system"] += len(stored)
            self._background(self.stored_for(stored), "announce system messages")
            return stored

        return Deferred.fromCoroutine(store())

    def _notify_stored(self, receivers: list[str]) -> None:
        """A receiver that logged in while its message was being stored pulls again."""
        for receiver in receivers:
            session = self._sessions.get(receiver)
            if session is not None:
                session.deliver(OFFLINE_NOTICE, cim_pb2.OfflineNotice())

    def stored_for(self, receivers: list[str]) -> Deferred[None]:
        """Messages reached the store for these users (the offline writer committed):
        those connected anywhere are told to pull (design: no gap)."""
        here = [user for user in receivers if user in self._sessions]
        self._notify_stored(here)
        elsewhere = [user for user in receivers if user not in self._sessions]
        if not elsewhere or self._bus is None:
            return succeed(None)
        bus = self._bus

        async def tell() -> None:
            routes = await self._state.presence.routes(elsewhere)
            by_node: dict[str, list[str]] = {}
            for user, node in routes.items():
                if node != self.node_id and self._alive(node):
                    by_node.setdefault(node, []).append(user)
            for node, users in by_node.items():
                envelope = cim_pb2.BusEnvelope(
                    origin_node=self.node_id, stored=cim_pb2.OfflineReady(receivers=users)
                )
                await bus.publish(node, envelope.SerializeToString())

        d = Deferred.fromCoroutine(tell())
        # Not telling is not losing: the receiver's next pull finds the messages.
        d.addErrback(lambda failure: failure.trap(BusUnavailable, StateUnavailable))
        d.addErrback(self._log_failure, "tell receivers to pull")
        return d

    def _settle(
        self, message: cim_pb2.Message, sender_device: str, status: Any, reason: str
    ) -> None:
        """A 1:1 message's final outcome: remember it and tell the sender."""
        outcome = {DELIVERED: "delivered", STORED: "stored"}.get(status, "failed")
        self._metrics.messages[outcome] += 1
        if outcome != "failed" and self._archive is not None:
            self._archive.archive(message)
        self._tell_sender(
            getattr(message, "from"),
            sender_device,
            cim_pb2.AckN(
                msg_id=message.id,
                client_seq=message.client_seq,
                status=status,
                reason=reason,
                to=message.to,
            ),
        )

    def ack_received(self, session: ClientSession, ack: cim_pb2.AckR) -> None:
        """ack:R. Only the message's receiver can acknowledge it."""
        user = session.record.user
        session.deliver(ACK_A, cim_pb2.AckA(msg_id=ack.msg_id))
        pending = self._pending.pop((ack.msg_id, user), None)
        if pending is None:
            return  # a group message, a duplicate ack, or someone else's message
        self._forget_pending(user, ack.msg_id)
        self._metrics.messages["delivered"] += 1
        self._metrics.observe_delivery(
            self._clock.seconds() - MessageIdGenerator.timestamp_ms(ack.msg_id) / 1000
        )
        if self._archive is not None:
            self._archive.archive(pending.message)
        self._tell_sender(
            pending.sender,
            pending.sender_device,
            cim_pb2.AckN(
                msg_id=ack.msg_id, client_seq=pending.client_seq, status=DELIVERED, to=user
            ),
        )

    def _forget_pending(self, receiver: str, msg_id: int) -> None:
        waiting = self._pending_by_receiver.get(receiver)
        if waiting is not None:
            waiting.discard(msg_id)
            if not waiting:
                del self._pending_by_receiver[receiver]

    def expire_pending(self) -> int:
        """Fail every msg:N held unacknowledged past its deadline; returns how many."""
        now = self._clock.seconds()
        expired = [key for key, pending in self._pending.items() if pending.deadline <= now]
        for msg_id, receiver in expired:
            pending = self._pending.pop((msg_id, receiver))
            self._forget_pending(receiver, msg_id)
            self._fail_pending(pending, msg_id, REASON_NOT_ACKNOWLEDGED)
        return len(expired)

    def _fail_pending_for(self, receiver: str, reason: str) -> None:
        """The receiver left holding unacknowledged messages: store them for its next
        login (it drops any it did show), or fail them where nothing can be stored."""
        for msg_id in self._pending_by_receiver.pop(receiver, ()):
            pending = self._pending.pop((msg_id, receiver), None)
            if pending is not None and self._offline is not None:
                self._store_offline(pending.message, pending.sender_device)
            elif pending is not None:
                self._fail_pending(pending, msg_id, reason)

    def _fail_pending(self, pending: _Pending, msg_id: int, reason: str) -> None:
        self._metrics.messages["failed"] += 1
        self._tell_sender(
            pending.sender,
            pending.sender_device,
            cim_pb2.AckN(
                msg_id=msg_id,
                client_seq=pending.client_seq,
                status=FAILED,
                reason=reason,
                to=pending.receiver,
            ),
        )

    def _tell_sender(self, sender: str, sender_device: str, ack: cim_pb2.AckN) -> None:
        """Record the outcome for retries, then reach the sender wherever it is."""
        self._background(
            self._state.receipts.record_outcome(
                sender, sender_device, ack.client_seq, ack.status, ack.reason
            ),
            "record an outcome",
        )
        session = self._sessions.get(sender)
        if session is not None:
            if session.record.device == sender_device:
                session.deliver(ACK_N, ack)
            return
        if self._bus is None:
            return  # offline: a retry finds the outcome in the state store
        envelope = cim_pb2.BusEnvelope(
            origin_node=self.node_id,
            outcome=cim_pb2.BusOutcome(sender=sender, sender_device=sender_device, ack=ack),
        )

        def routed(node: str | None) -> Any:
            if node is None or node == self.node_id or self._bus is None:
                return None
            return self._bus.publish(node, envelope.SerializeToString())

        d = self._state.presence.route(sender)
        d.addCallback(routed)
        # Not reaching the sender is not fatal: its retry reads the recorded outcome.
        d.addErrback(lambda failure: failure.trap(BusUnavailable, StateUnavailable))
        self._background(d, "tell a sender on another node")

    # --- offline pull (design: 方案2) -------------------------------------------------

    def offline_requested(self, session: ClientSession, request: cim_pb2.OfflineR) -> None:
        """A page of the user's stored messages; asking acknowledges the previous page."""
        if self._offline is None:
            session.deliver(OFFLINE_A, cim_pb2.OfflineA())
            return
        offline = self._offline
        user = session.record.user
        limit = min(request.limit or self._page_size, 1000)

        async def answer() -> None:
            acknowledged = 0
            if request.ack_ids:
                acknowledged = await offline.acknowledge(user, list(request.ack_ids))
            page = await offline.page(user, request.before or None, limit)
            session.deliver(
                OFFLINE_A,
                cim_pb2.OfflineA(
                    messages=[cim_pb2.Message.FromString(r.payload) for r in page.records],
                    more=page.more,
                    next_before=page.next_before or 0,
                    acknowledged=acknowledged,
                ),
            )

        Deferred.fromCoroutine(answer()).addErrback(self._log_failure, "answer an offline pull")

    def offline_acknowledged(self, session: ClientSession, request: cim_pb2.OfflineAckR) -> None:
        if self._offline is None:
            session.deliver(OFFLINE_ACK_A, cim_pb2.OfflineAckA())
            return
        d = self._offline.acknowledge(session.record.user, list(request.ack_ids))
        d.addCallback(
            lambda count: session.deliver(OFFLINE_ACK_A, cim_pb2.OfflineAckA(acknowledged=count))
        )
        d.addErrback(self._log_failure, "acknowledge offline messages")

    def offline_summary_requested(
        self, session: ClientSession, request: cim_pb2.OfflineSummaryR
    ) -> None:
        if self._offline is None:
            session.deliver(OFFLINE_SUMMARY_A, cim_pb2.OfflineSummaryA())
            return

        def answer(senders: list[Any]) -> None:
            session.deliver(
                OFFLINE_SUMMARY_A,
                cim_pb2.OfflineSummaryA(
                    senders=[
                        cim_pb2.SenderCount(
                            sender=s.sender, count=s.count, newest_msg_id=s.newest_msg_id
                        )
                        for s in senders
                    ],
                    total=sum(s.count for s in senders),
                ),
            )

        d = self._offline.summary(session.record.user)
        d.addCallback(answer)
        d.addErrback(self._log_failure, "summarise offline messages")

    # --- history ----------------------------------------------------------------------

    def history_requested(self, session: ClientSession, request: cim_pb2.HistoryR) -> None:
        if self._history is None:
            session.deliver(
                HISTORY_A,
                cim_pb2.HistoryA(error="unavailable", message="history is not kept on this node"),
            )
            return
        d = self._history.answer(session.record.user, request)
        d.addCallback(lambda answer: session.deliver(HISTORY_A, answer))
        d.addErrback(self._log_failure, "answer a history request")

    # --- groups -----------------------------------------------------------------------

    def group_requested(self, session: ClientSession, request: cim_pb2.GroupRequest) -> None:
        if self._groups is None:
            session.deliver(
                GROUP_A,
                cim_pb2.GroupAnswer(
                    request_id=request.request_id,
                    ok=False,
                    error="unavailable",
                    message="groups are not available on this node",
                ),
            )
            return
        d = self._groups.answer(session.record.user, request)
        d.addCallback(lambda answer: session.deliver(GROUP_A, answer))
        d.addErrback(self._log_failure, "answer a group request")

    def _numbered(self, seq: int, session: ClientSession, message: cim_pb2.Message) -> None:
        message.group_seq = seq
        self._group_accepted(session, message)

    def _group_accepted(self, session: ClientSession, message: cim_pb2.Message) -> None:
        """The node is responsible for the group message now: tell the sender, fan out."""
        self._metrics.messages["group"] += 1
        if self._archive is not None:
            self._archive.archive(message)
        self._tell_sender(
            session.record.user,
            session.record.device,
            cim_pb2.AckN(
                msg_id=message.id,
                client_seq=message.client_seq,
                status=ACCEPTED,
                to=message.group,
            ),
        )
        queue = self._fanout_queues.get(message.group)
        if queue is not None:
            queue.append(message)  # a fan-out of this group is running: keep the order
            return
        self._fanout_queues[message.group] = deque([message])
        done = Deferred.fromCoroutine(self._fan_out(message.group))
        done.addErrback(self._log_failure, "fan out a group message")

    async def _fan_out(self, group: str) -> None:
        """Each queued message of a group to every member, in slices, in order."""
        queue = self._fanout_queues[group]
        try:
            while queue:
                message = queue[0]
                try:
                    await self._fan_out_one(message)
                except Exception:
                    self.log.failure("fan-out of group message {id} failed", id=message.id)
                    self._metrics.messages["group_fanout_failed"] += 1
                queue.popleft()
        finally:
            del self._fanout_queues[group]

    async def _fan_out_one(self, message: cim_pb2.Message) -> None:
        assert self._groups is not None
        sender = getattr(message, "from")
        members = [m for m in await self._groups.member_names(message.group) if m != sender]
        here = [m for m in members if m in self._sessions]
        elsewhere = [m for m in members if m not in self._sessions]
        for start in range(0, len(here), FANOUT_SLICE):
            if start:
                await deferLater(self._clock, 0, lambda: None)  # let other users in
            for member in here[start : start + FANOUT_SLICE]:
                session = self._sessions.get(member)
                if session is not None:
                    session.deliver(MSG_N, message)
                    self._metrics.messages["group_delivered"] += 1
        if not elsewhere:
            return
        routes: dict[str, str] = {}
        if self._bus is not None:
            try:
                routes = await self._state.presence.routes(elsewhere)
            except StateUnavailable:
                routes = {}
        by_node: dict[str, list[str]] = {}
        for member in elsewhere:
            node = routes.get(member)
            if node is not None and node != self.node_id and self._alive(node):
                by_node.setdefault(node, []).append(member)
        for node, users in by_node.items():
            try:
                await self._forward(node, message, users, "")
            except BusUnavailable as exc:
                self._group_missed(message, len(users), f"node {node} unreachable: {exc}")
        reached = {user for users in by_node.values() for user in users}
        offline = [member for member in elsewhere if member not in reached]
        if offline:
            await self._store_group_copies(message, offline)

    async def _store_group_copies(self, message: cim_pb2.Message, members: list[str]) -> None:
        """Offline members get their copy through the offline store."""
        if self._offline is None:
            self._group_missed(message, len(members), "offline")
            return
        try:
            await self._offline.store([(member, message) for member in members])
        except OfflineFull as full:
            # Leave out the full boxes (never silently: counted and logged), keep the rest.
            rest = [member for member in members if member not in set(full.receivers)]
            self._group_missed(message, len(members) - len(rest), "offline box full")
            if rest:
                await self._store_group_copies(message, rest)
            return
        self._metrics.messages["group_stored"] += len(members)
        self.stored_for(members)

    def _group_missed(self, message: cim_pb2.Message, count: int, why: str) -> None:
        self._metrics.messages["group_missed"] += count
        self.log.info(
            "group message {id} in {group} missed by {count} members: {why}",
            id=message.id,
            group=message.group,
            count=count,
            why=why,
        )

    # --- the bus: other nodes talking to this one -------------------------------------

    def bus_message_received(self, payload: bytes) -> None:
        envelope = cim_pb2.BusEnvelope.FromString(payload)
        kind = envelope.WhichOneof("body")
        if kind == "deliver":
            self._delivery_from_bus(envelope.deliver)
        elif kind == "stored":
            self._notify_stored(list(envelope.stored.receivers))
        elif kind == "outcome":
            outcome = envelope.outcome
            session = self._sessions.get(outcome.sender)
            if session is not None and session.record.device == outcome.sender_device:
                session.deliver(ACK_N, outcome.ack)

    def _delivery_from_bus(self, delivery: cim_pb2.BusDelivery) -> None:
        message = delivery.message
        if message.group:
            for member in delivery.receivers:
                session = self._sessions.get(member)
                if session is not None:
                    session.deliver(MSG_N, message)
                    self._metrics.messages["group_delivered"] += 1
                else:
                    self._metrics.messages["group_missed"] += 1
            return
        for receiver in delivery.receivers:
            if receiver in self._sessions:
                self._deliver_here(message, delivery.sender_device, receiver)
            else:
                # It moved or left since the sender's node looked up its route.
                self._receiver_not_here(message, delivery.sender_device)

    # --- presence ---------------------------------------------------------------------

    def online_requested(self, session: ClientSession, request: cim_pb2.OnlineR) -> None:
        limit = min(request.limit or DEFAULT_ONLINE_PAGE, MAX_ONLINE_PAGE)
        d = self._state.presence.online_users(request.offset, limit)

        def answer(page: tuple[int, list[str]]) -> None:
            total, users = page
            session.deliver(ONLINE_A, cim_pb2.OnlineA(total=total, users=users))

        d.addCallback(answer)
        d.addErrback(self._log_failure, "list online users")

    # --- plumbing ---------------------------------------------------------------------

    def _background(self, d: Deferred[Any], what: str) -> None:
        d.addErrback(self._log_failure, what)

    def _log_failure(self, failure: Failure, what: str) -> None:
        self.log.failure("could not {what}", failure, what=what)
