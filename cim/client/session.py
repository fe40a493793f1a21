"""A logged-in chat session that stays online: the client library's main object.

It logs in through the router, connects to the node the router picked, and when the
connection drops it reconnects with jittered exponential backoff. Reconnecting tries
the cached node with the still-valid token first (design: 快速连接, one round trip);
only if that fails does it go back to the router for a new login.

Sent messages wait in an ``Outbox`` for their ack:N and are retried or reported failed
by the chosen policy (``retry="auto"`` or ``"manual"``); received ones pass through an
``Inbox`` that drops duplicates and restores each sender's order before ``on_message``.
Both live in ``cim.client.delivery``; the connection only feeds them frames.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends import backoff
from cim.client.answers import Answers
from cim.client.connection import DEFAULT_MAX_FRAME_SIZE, ImClientProtocol, LoginRefused
from cim.client.delivery import (
    REASON_CONNECTION_CLOSED,
    RETRY_AUTO,
    STATUS_NAMES,
    DeliveryOutcome,
    Inbox,
    Outbox,
    RetryPolicy,
)
from cim.client.errors import failure_line
from cim.client.router import LoginTicket, NodeTarget, RouterClient, RouterError
from cim.client.seen import FileSeenStore, MemorySeenStore, SeenStore
from cim.config import KNOWN_SUITES, SUITE_CHACHA
from cim.protocols import cim_pb2
from cim.protocols.handshake import HandshakeRefused

__all__ = [
    "STATUS_NAMES",
    "Backoff",
    "ChatClient",
    "DeliveryOutcome",
    "RetryPolicy",
    "SessionFailed",
    "SessionRefused",
    "Unreachable",
]

_STATUS = cim_pb2.LoginResult

Connector = Callable[[str, int, ImClientProtocol], "Deferred[Any]"]


OFFLINE_ACK_CHUNK = 1000
"""Ids per OFFLINE_ACK_R frame, far below the frame size limit."""


class SessionFailed(Exception):
    """The session cannot go on without the user (bad password, refused suite, kicked)."""


@dataclass(frozen=True)
class Backoff(backoff.Backoff):
    """The client's reconnect wait: the one backoff policy, from 0.5 s up to 30 s, with
    equal jitter (half the step fixed, half random) so that the clients of a node that
    went away do not all come back at once."""

    initial: float = 0.5
    maximum: float = 30.0
    jitter: float = 0.5


class ChatClient:
    """One user's device, online for as long as it runs.

    ``retry`` is ``"auto"`` (resend after 10, 30, 60 s, then report failed) or
    ``"manual"`` (report failed after 10 s or when the connection drops; the user calls
    ``resend``), or a full ``RetryPolicy``. ``seen_path`` is a file where the inbox
    remembers what it handed to the application, so duplicates stay out across a
    restart of the client (None: memory only); ``seen_store`` replaces it with any
    ``SeenStore``. ``order_window`` is how long a message after a gap (1:1 or group)
    message is held to restore order (0: arrival order).

    Client sequences start from the wall clock in microseconds, so they keep
    increasing across restarts of the sender and receivers' dedup by sequence never
    mistakes a new message for an old one (unless the clock goes back).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        router_url: str | Sequence[str],
        user: str,
        password: str,
        device: str = "cli",
        suite: str | None = None,
        connector: Connector | None = None,
        router: RouterClient | None = None,
        backoff: Backoff = Backoff(),
        rng: random.Random | None = None,
        retry: str | RetryPolicy = RETRY_AUTO,
        seen_path: str | None = None,
        seen_store: SeenStore | None = None,
        order_window: float = 2.0,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.user = user
        self._password = password
        self.device = device
        # An explicit suite is the only one offered; otherwise every known suite is
        # offered and the node's preferred one (the router lists them) is chosen.
        self.requested_suite = suite
        self.offered: tuple[str, ...] = (suite,) if suite else KNOWN_SUITES
        self.suite = suite or SUITE_CHACHA
        self._router = router or RouterClient(reactor, router_url)
        self._connect = connector or self._tcp_connect
        self._backoff = backoff
        self._rng = rng or random.Random()
        self.ticket: LoginTicket | None = None
        self.protocol: ImClientProtocol | None = None
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE
        """The largest frame the connection takes; pages are asked to stay below it."""
        self.state = "offline"
        self._stopping = False
        self._online_waiters: list[Deferred[None]] = []
        self._next_seq = int(time.time() * 1_000_000)
        policy = retry if isinstance(retry, RetryPolicy) else RetryPolicy(mode=retry)
        self.outbox = Outbox(self.clock, self._transmit, self._outcome, policy)
        if seen_store is None:
            seen_store = FileSeenStore(seen_path) if seen_path else MemorySeenStore()
        self.inbox = Inbox(
            self.clock, seen_store, self._hand_to_application, self._acknowledge, order_window
        )
        self.inbox.gap_persists = self._gap_persists
        self.answers = Answers(
            lambda: self.protocol, lambda: SessionFailed(f"not connected ({self.state})")
        )
        self._offline_ids: set[int] = set()
        self._offline_acks: list[int] = []
        # msg id -> (conversation, seq) of what was received and not yet acknowledged:
        # an acknowledgement moves the device's cursor there (timelines, #14).
        self._places: dict[int, tuple[str, int]] = {}
        self._ack_flush: Any = None
        self._pulling: Deferred[int] | None = None
        self._pull_again = False
        self._live_during_pull: list[cim_pb2.Message] = []
        # The last client_seq sent to each receiver or group, for Message.prev_seq.
        self._last_seq_to: dict[tuple[str, str], int] = {}
        self._reconnect_call: Any = None
        self._connecting: Deferred[Any] | None = None
        self._attempting: Deferred[None] | None = None
        self._attempt = 0
        # The first connection's deadline, and what was being reached when it passed.
        self._first_contact: Any = None
        self._reaching = "the router"
        self._last_failure = ""
        # Application callbacks.
        # Returning False declines the message: it is not acknowledged, the node keeps it.
        self.on_message: Callable[[cim_pb2.Message], object] = lambda message: None
        self.on_state: Callable[[str, str], None] = lambda state, detail: None
        self.on_outcome: Callable[[DeliveryOutcome], None] = lambda outcome: None

    # --- connecting -------------------------------------------------------------------

    def start(self, deadline: float | None = None) -> Deferred[None]:
        """Fires when the session is online for the first time, or fails for good.

        With a ``deadline`` (seconds), a router or node that cannot be reached by then
        fails it with ``Unreachable`` naming which one and why, and the session stops:
        retrying is for a connection that was there, not for a daemon that is not.
        Without one, the first connection is retried like any reconnection.
        """
        waiter: Deferred[None] = Deferred()
        self._online_waiters.append(waiter)
        if deadline is not None and self._first_contact is None:
            self._first_contact = self.clock.callLater(deadline, self._unreachable, deadline)
        self._connect_soon(0)
        return waiter

    def _end_first_contact(self) -> None:
        if self._first_contact is not None and self._first_contact.active():
            self._first_contact.cancel()
        self._first_contact = None

    def _unreachable(self, deadline: float) -> None:
        self._first_contact = None
        why = self._last_failure or f"cannot reach {self._reaching}: no answer"
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._give_up(f"{why} (gave up after {deadline:g} s)", Unreachable)
        for attempt in (self._connecting, self._attempting):
            if attempt is not None:
                attempt.cancel()

    def stop_receiving(self) -> None:
        """Take no more messages: those not yet handed to ``on_message`` stay unacknowledged,
        so the node keeps them for the next login (and no offline pull is made).

        Called from inside ``on_message``, the message being handed over was taken (it is
        acknowledged); to decline that one too, also return False from ``on_message``.
        """
        self.inbox.close()

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        self.on_state(state, detail)

    def _connect_soon(self, delay: float) -> None:
        if self._stopping:
            return
        if delay:
            self._set_state("reconnecting", f"in {delay:.1f} s")
        self._reconnect_call = self.clock.callLater(delay, self._attempt_now)

    def _attempt_now(self) -> None:
        self._attempting = ensureDeferred(self._establish())

    async def _establish(self) -> None:
        self._reconnect_call = None
        self._set_state("connecting")
        try:
            await self._connect_once()
        except SessionFailed as failure:
            self._give_up(str(failure))
        except CancelledError:
            pass
        except Exception as exc:
            self._attempt += 1
            delay = self._backoff.delay(self._attempt, self._rng)
            if isinstance(exc, RetryLater):
                delay = max(delay, exc.delay)
            self.log.info(
                "connecting failed ({why}); retrying in {delay:.1f} s", why=exc, delay=delay
            )
            self._connect_soon(delay)

    async def _connect_once(self) -> None:
        try:
            await self._reach_a_node()
        except Exception as exc:
            if not isinstance(exc, CancelledError | SessionFailed):
                self._last_failure = failure_line(self._reaching, exc)
            raise

    async def _reach_a_node(self) -> None:
        cached = self.ticket
        if cached is not None and cached.expires_at > self.clock.seconds():
            try:
                await self._open(cached)
                return
            except LoginRefused as refusal:
                if refusal.status == _STATUS.WRONG_NODE and refusal.node is not None:
                    moved = NodeTarget(refusal.node.id, refusal.node.host, refusal.node.port)
                    self.ticket = replace(cached, node=moved)
                    await self._open(self.ticket)
                    return
                self.log.info("cached login no longer valid: {why}", why=refusal)
            except (ConnectError, OSError) as exc:
                self.log.info("fast reconnect to the cached node failed: {why}", why=exc)
        self.ticket = await self._login()
        await self._open(self.ticket)

    async def _login(self) -> LoginTicket:
        self._reaching = "the router"
        try:
            ticket = await self._router.login(self.user, self._password, self.device)
        except RouterError as error:
            if error.status in (400, 401, 403, 409):
                raise SessionRefused(str(error)) from None
            raise
        usable = [suite for suite in ticket.cipher_suites if suite in self.offered]
        if not usable:
            raise SessionRefused(
                f"the node does not allow cipher suite {self.offered[0]!r}; "
                f"it allows: {', '.join(ticket.cipher_suites)}"
            )
        self.suite = usable[0]
        return ticket

    async def _open(self, ticket: LoginTicket) -> None:
        events = _CurrentConnectionOnly(self)
        protocol = ImClientProtocol(
            self.clock,
            events,
            ticket.server_key,
            ticket.token,
            self.device,
            self.suite,
            self.offered,
            max_frame_size=self.max_frame_size,
        )
        events.protocol = protocol
        node = ticket.node
        self._reaching = f"the node {node.node_id} at {node.host}:{node.port}".replace("  ", " ")
        self._connecting = self._connect(ticket.node.host, ticket.node.port, protocol)
        try:
            await self._connecting
        finally:
            self._connecting = None
        try:
            await protocol.logged_in
        except HandshakeRefused as refusal:
            if refusal.reason == cim_pb2.HandshakeError.RATE_LIMITED:
                raise RetryLater(refusal.retry_after_ms / 1000, str(refusal)) from None
            raise SessionRefused(f"the node refused the handshake: {refusal.message}") from None
        self.protocol = protocol
        self._attempt = 0
        self._end_first_contact()
        # Before anyone hears "online" (and sends more), so the resends keep their order.
        self.outbox.connection_made()
        self._set_state("online", f"{ticket.node.host}:{ticket.node.port}")
        waiters, self._online_waiters = self._online_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self.pull_offline()

    def _tcp_connect(self, host: str, port: int, protocol: ImClientProtocol) -> Deferred[Any]:
        return connectProtocol(HostnameEndpoint(self.reactor, host, port, timeout=10), protocol)

    def _give_up(self, why: str, error: type[SessionFailed] | None = None) -> None:
        self._stopping = True
        self._end_first_contact()
        self._set_state("stopped", why)
        self.inbox.flush()
        self.outbox.fail_all(f"the session stopped: {why}")
        waiters, self._online_waiters = self._online_waiters, []
        for waiter in waiters:
            waiter.errback((error or SessionRefused)(why))

    # --- ConnectionEvents -------------------------------------------------------------

    def frame_received(self, frame_type: int, message: ProtobufMessage) -> None:
        if self.answers.answer(frame_type, message):
            return
        if frame_type == cim_pb2.MSG_N:
            if self._stopping:
                return  # unacknowledged, so the node stores it for the next login
            self._places[message.id] = (message.conversation, message.seq)  # type: ignore[attr-defined]
            if self._pulling is not None:
                # Stored messages are older than live ones: let the pull go first.
                self._live_during_pull.append(message)  # type: ignore[arg-type]
            else:
                self.inbox.receive(message)  # type: ignore[arg-type]
        elif frame_type == cim_pb2.MSG_A:
            self.outbox.taken(message)  # type: ignore[arg-type]
        elif frame_type == cim_pb2.ACK_N:
            self.outbox.acknowledged(message)  # type: ignore[arg-type]
        elif frame_type == cim_pb2.OFFLINE_NOTICE:
            self.pull_offline()
        elif frame_type == cim_pb2.OFFLINE_ACK_A:
            pass  # the store deleted what we acknowledged
        elif frame_type == cim_pb2.KICKED:
            self._kicked(message)  # type: ignore[arg-type]
        elif frame_type == cim_pb2.GOING_AWAY:
            self._going_away = message.reconnect_after_ms / 1000  # type: ignore[attr-defined]
        elif frame_type == cim_pb2.ERROR:
            self.outbox.refused(message)  # type: ignore[arg-type]

    def _kicked(self, kicked: cim_pb2.Kicked) -> None:
        if self._stopping:
            return  # our own logout, or we already gave up
        if kicked.code == cim_pb2.Kicked.SESSION_EXPIRED:
            self.ticket = None  # log in again through the router, then reconnect
            return
        self._give_up(f"kicked: {kicked.reason}")

    def connection_closed(self, reason: Failure) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is None:
            return  # never got online; _establish handles it
        self.outbox.connection_lost(REASON_CONNECTION_CLOSED)
        self.answers.connection_lost(reason)
        if self._stopping:
            if self.state != "stopped":
                self._set_state("offline")
            return
        delay = getattr(self, "_going_away", 0.0) or self._backoff.delay(0, self._rng)
        self._going_away = 0.0
        self._connect_soon(delay)

    # --- messages ---------------------------------------------------------------------

    def _hand_to_application(self, message: cim_pb2.Message) -> object:
        return self.on_message(message)  # looked up now: the application sets it later

    def _acknowledge(self, msg_id: int) -> None:
        """The application has the message: acknowledge it where it came from."""
        if msg_id in self._offline_ids:
            # Pulled from the offline store: deleted there once the application has it.
            self._offline_ids.discard(msg_id)
            self._offline_acks.append(msg_id)
            if self._ack_flush is None:
                self._ack_flush = self.clock.callLater(0, self._flush_offline_acks)
            return
        conversation, seq = self._places.pop(msg_id, ("", 0))
        if self.protocol is not None:
            self.protocol.send(
                cim_pb2.ACK_R,
                cim_pb2.AckR(msg_id=msg_id, conversation=conversation, through_seq=seq),
            )

    # --- offline messages (design: 方案2) ------------------------------------------

    def pull_offline(self) -> Deferred[int]:
        """Pull every stored message (all senders, page by page, newest page first).

        Runs on every login and reconnect and when the node says something was stored.
        The messages go through the inbox (dedup, order) oldest first, and each is
        acknowledged to the store only once the application has it: a client that
        dies before that gets the same messages again and shows them once. Fires with
        how many messages the pull brought.
        """
        if self.inbox.closed:
            return succeed(0)  # nothing more is taken: the store keeps what it has
        if self._pulling is not None:
            self._pull_again = True
            return self._pulling
        self._pulling = Deferred.fromCoroutine(self._pull())

        def done(result: Any) -> Any:
            self._pulling = None
            live, self._live_during_pull = self._live_during_pull, []
            for message in live:
                self.inbox.receive(message)
            if self._pull_again and self.protocol is not None:
                self._pull_again = False
                self.pull_offline()
            return result

        self._pulling.addBoth(done)
        self._pulling.addErrback(self._pull_failed)
        return self._pulling

    async def _pull(self) -> int:
        self._pull_again = False
        batch: list[cim_pb2.Message] = []
        before = 0
        while True:
            page = await self.answers.offline_page(
                cim_pb2.OfflineR(before=before, max_bytes=self.max_frame_size)
            )
            batch.extend(page.messages)
            if not page.more:
                break
            before = page.next_before
        for message in sorted(batch, key=lambda m: m.id):
            self._offline_ids.add(message.id)
            self._places[message.id] = (message.conversation, message.seq)
            self.inbox.receive(message)
        return len(batch)

    def _gap_persists(self) -> None:
        if self.protocol is not None:
            self.pull_offline()

    def _pull_failed(self, failure: Failure) -> int:
        self.log.info("offline pull interrupted: {why}", why=failure.getErrorMessage())
        return 0

    def _flush_offline_acks(self) -> None:
        self._ack_flush = None
        acks, self._offline_acks = self._offline_acks, []
        if self.protocol is None:
            return  # not acknowledged: the next pull brings them again, the inbox drops them
        marks: dict[str, int] = {}
        for msg_id in acks:
            conversation, seq = self._places.pop(msg_id, ("", 0))
            if conversation:
                marks[conversation] = max(marks.get(conversation, 0), seq)
        cursors = [cim_pb2.Cursor(conversation=c, seq=s) for c, s in sorted(marks.items())]
        for start in range(0, len(cursors), OFFLINE_ACK_CHUNK):
            self.protocol.send(
                cim_pb2.OFFLINE_ACK_R,
                cim_pb2.OfflineAckR(cursors=cursors[start : start + OFFLINE_ACK_CHUNK]),
            )

    def offline_summary(self) -> Deferred[cim_pb2.OfflineSummaryA]:
        """Counts per sender without the messages (design: 优化方案1)."""
        return self.answers.offline_summary()

    def history(
        self, peer_or_group: str, limit: int = 50, before: int = 0, group: bool = False
    ) -> Deferred[cim_pb2.HistoryA]:
        """One page of a conversation's archive, newest first, for catching up.

        ``group`` says ``peer_or_group`` is a group id. ``before`` is 0 for the newest
        page, else the previous answer's ``next_before``. A refusal (not a participant:
        ``error == "forbidden"``) comes as an answer with ``error`` set, not a failure.
        These messages bypass the inbox: they are the record, not new arrivals.
        """
        request = cim_pb2.HistoryR(before=before, limit=limit, max_bytes=self.max_frame_size)
        if group:
            request.group = peer_or_group
        else:
            request.peer = peer_or_group
        return self.answers.history(request)

    def _transmit(self, message: cim_pb2.Message) -> bool:
        if self.protocol is None:
            return False
        self.protocol.send(cim_pb2.MSG_R, message)
        return True

    def _outcome(self, outcome: DeliveryOutcome) -> None:
        self.on_outcome(outcome)

    def send_text(self, to: str, text: str) -> Deferred[DeliveryOutcome]:
        """Send a text; fires with its outcome once it is known (see send_message)."""
        return self.send_message(cim_pb2.Message(to=to, text=text))

    def send_message(self, message: cim_pb2.Message) -> Deferred[DeliveryOutcome]:
        """Send any user message (text, media, location, group); the library numbers it.

        Fires once with the outcome: delivered, stored, accepted (group) or failed with
        a reason; the Deferred never fails. While the session is reconnecting, ``auto``
        keeps the message for the new connection and ``manual`` fails it at once.
        """
        client_seq = self._next_seq
        self._next_seq += 1
        message.client_seq = client_seq
        message.client_time_ms = int(self.clock.seconds() * 1000)
        conversation = ("group", message.group) if message.group else ("user", message.to)
        message.prev_seq = self._last_seq_to.get(conversation, 0)
        self._last_seq_to[conversation] = client_seq
        refuse = None
        if self.protocol is None and (self._stopping or self.state in ("offline", "stopped")):
            refuse = f"not connected ({self.state})"
        return self.outbox.add(message, refuse)

    def resend(self, client_seq: int) -> Deferred[DeliveryOutcome]:
        """Send a failed (or still waiting) message again with the same client_seq.

        The node answers a repeated msg:R with the same server id and the receiver
        shows it once, so this is safe whatever became of the first try. Raises
        KeyError for a sequence that is neither waiting nor among the recent failures.
        """
        return self.outbox.resend(client_seq)

    def online(self, offset: int = 0, limit: int = 100) -> Deferred[cim_pb2.OnlineA]:
        return self.answers.online(offset, limit)

    def group_request(self, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        """Send a GROUP_R (create, rename, add, remove, leave, ...) and get its answer."""
        return self.answers.group(request)

    def contacts_request(
        self, request: cim_pb2.ContactsRequest
    ) -> Deferred[cim_pb2.ContactsAnswer]:
        """Send a CONTACTS_R (list, request, accept, block, settings, ...), get its answer."""
        return self.answers.contacts(request)

    def send_group(self, group_id: str, text: str) -> Deferred[DeliveryOutcome]:
        """Post a text to a group; the outcome is "accepted" once the node took it."""
        return self.send_message(cim_pb2.Message(group=group_id, text=text))

    # --- stopping ---------------------------------------------------------------------

    async def stop(self, logout: bool = True) -> None:
        """Close the connection; with logout, also end the session at the router."""
        self._stopping = True
        self._end_first_contact()
        # Held messages were received: hand them over (and ack them) while we can.
        self.inbox.flush()
        if self._ack_flush is not None and self._ack_flush.active():
            self._ack_flush.cancel()
        self._flush_offline_acks()  # what the application has, the store may delete
        self.outbox.fail_all("the client stopped before an answer came")
        self.inbox.seen.close()
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.lose_connection()
        if logout and self.ticket is not None:
            try:
                await self._router.logout(self.ticket.token)
            except RouterError as error:
                self.log.info("logout failed: {why}", why=error)
        self.ticket = None


class RetryLater(Exception):
    """The node asked us to come back later (too many handshakes from our address)."""

    def __init__(self, delay: float, why: str) -> None:
        super().__init__(why)
        self.delay = delay


class SessionRefused(SessionFailed):
    """The router or node said no: wrong password, unknown user, cipher suite, kicked."""


class Unreachable(SessionFailed):
    """The router or the node could not be reached before the first connection's deadline."""


class _CurrentConnectionOnly:
    """Passes a connection's events on only while it is the session's current one.

    After a fast reconnect the abandoned connection may still say something (such as
    "replaced by a newer connection"); that must not stop the new one.
    """

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.protocol: ImClientProtocol | None = None

    def frame_received(self, frame_type: int, message: ProtobufMessage) -> None:
        if self.client.protocol is self.protocol:
            self.client.frame_received(frame_type, message)

    def connection_closed(self, reason: Failure) -> None:
        if self.client.protocol is self.protocol:
            self.client.connection_closed(reason)
