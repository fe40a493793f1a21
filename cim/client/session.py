"""A logged-in chat session that stays online: the client library's main object.

``ChatClient`` is one user's device. Its parts, each in its own module:

- reaching a node (router login, fast reconnect, backoff, the first deadline):
  ``cim.client.dialing.Dialer``;
- sending: the ``Outbox`` (``cim.client.delivery``) waits for every message's ack:N and
  retries or reports it by the chosen policy;
- receiving: the ``Inbox`` (``cim.client.inbox``) keeps each conversation's watermark,
  drops duplicates, fills gaps with HISTORY_R and hands messages over in seq order;
- recall and edit, and the changes of others applied to what was handed over:
  ``Corrections`` (``cim.client.corrections``);
- catching up after a login: ``CatchUp`` (``cim.client.catch_up``): the summary, then
  pages newest first;
- requests that wait for an answer, with deadlines and retries: ``Answers``
  (``cim.client.answers``).

The app's state (``set_app_state``: foreground or background) is the session's own:
the node is told at once and on every new connection, and the connection's heartbeat
takes the interval the node answers (a background app wakes the radio less often).
Typing notices go out with ``typing`` and come in through ``on_typing``.

The session itself only routes frames between the connection and these parts, and
tells the application (``on_message``, ``on_outcome``, ``on_state``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.client.acks import CumulativeAcks
from cim.client.answers import Answers, RequestFailed, RequestPolicy
from cim.client.catch_up import CatchUp, CatchUpResult
from cim.client.connection import DEFAULT_MAX_FRAME_SIZE, ImClientProtocol
from cim.client.corrections import EVENTS, Change, Corrections, change_of
from cim.client.delivery import (
    REASON_CONNECTION_CLOSED,
    RETRY_AUTO,
    STATUS_NAMES,
    DeliveryOutcome,
    Outbox,
    RetryPolicy,
)
from cim.client.dialing import (
    Backoff,
    Connector,
    Dialer,
    SessionFailed,
    SessionRefused,
    Unreachable,
)
from cim.client.inbox import Inbox
from cim.client.reads import ReadEvent, ReadState
from cim.client.router import LoginTicket, RouterClient
from cim.client.seen import FileSeenStore, MemorySeenStore, SeenStore
from cim.config import SUITE_CHACHA
from cim.protocols import cim_pb2
from cim.reactor import ICimReactor

__all__ = [
    "STATUS_NAMES",
    "Backoff",
    "CatchUpResult",
    "Change",
    "ChatClient",
    "DeliveryOutcome",
    "ReadEvent",
    "RequestFailed",
    "RetryPolicy",
    "SessionFailed",
    "SessionRefused",
    "Unreachable",
]


DEFAULT_BACKOFF = Backoff()

APP_STATES = {"foreground": cim_pb2.APP_FOREGROUND, "background": cim_pb2.APP_BACKGROUND}
"""The app states ``set_app_state`` takes, and their wire values."""


def _decline(message: cim_pb2.Message) -> bool:
    """The default ``on_message``: an application that set none takes nothing, so the
    node keeps every message for one that does (no cursor moves for unseen messages)."""
    return False


def _decline_change(change: Change) -> bool:
    """The default ``on_change``: as ``on_message``'s, nothing taken."""
    return False


class ChatClient:
    """One user's device, online for as long as it runs.

    ``retry`` is ``"auto"`` (resend after 10, 30, 60 s, then report failed) or
    ``"manual"`` (report failed after 10 s or when the connection drops; the user calls
    ``resend``), or a full ``RetryPolicy``. ``seen_path`` is a file where the inbox
    remembers the ids it handed to the application, so duplicates stay out across a
    restart of the client (None: memory only); ``seen_store`` replaces it with any
    ``SeenStore``.

    ``receiving`` False makes a device that sends and asks but takes no messages: no
    catch-up, no message handed over, nothing acknowledged, so no cursor moves (what
    cim-client's send, group, history ... use). ``ordered`` chooses how catch-up hands
    messages over (``cim.client.catch_up``): False, the newest page of the newest
    conversation first, page by page; True, each conversation oldest first. Live
    messages always come in seq order per conversation. ``requests`` is the deadline
    and retries of every request (``cim.client.answers``). ``transport`` "websocket"
    connects to the node's WebSocket gateway (the login's ``ws_url``) instead of its
    TCP port, as a browser does (``cim.client.websocket``).

    Client sequences start from the wall clock in microseconds, so they keep
    increasing across restarts of the sender and the node's dedup of resent messages
    by sequence never mistakes a new message for an old one (unless the clock goes
    back).
    """

    log = Logger()

    def __init__(
        self,
        reactor: ICimReactor,
        router_url: str | Sequence[str],
        user: str,
        password: str,
        device: str = "cli",
        suite: str | None = None,
        connector: Connector | None = None,
        router: RouterClient | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        rng: random.Random | None = None,
        retry: str | RetryPolicy = RETRY_AUTO,
        seen_path: str | None = None,
        seen_store: SeenStore | None = None,
        receiving: bool = True,
        ordered: bool = False,
        requests: RequestPolicy | None = None,
        transport: str = "tcp",
    ) -> None:
        self.reactor = reactor
        self.user = user
        self.device = device
        self.suite = suite or SUITE_CHACHA
        self.ticket: LoginTicket | None = None
        self.protocol: ImClientProtocol | None = None
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE
        """The largest frame the connection takes; pages are asked to stay below it."""
        self.state = "offline"
        self.stopping = False
        rng = rng or random.Random()
        self.dialer = Dialer(
            self,
            reactor,
            router or RouterClient(reactor, router_url),
            password,
            suite,
            connector,
            backoff,
            rng,
            transport,
        )
        self.offered = self.dialer.offered
        """The cipher suites the hello offers (only ``suite`` if one was asked for)."""
        self._online_waiters: list[Deferred[None]] = []
        self._next_seq = int(time.time() * 1_000_000)
        # The last client_seq sent to each receiver or group, for Message.prev_seq.
        self._last_seq_to: dict[tuple[str, str], int] = {}
        policy = retry if isinstance(retry, RetryPolicy) else RetryPolicy(mode=retry)
        self.outbox = Outbox(
            reactor, self._transmit, lambda outcome: self.on_outcome(outcome), policy, rng=rng
        )
        self.answers = Answers(
            reactor,
            lambda: self.protocol,
            lambda: SessionFailed(f"not connected ({self.state})"),
            requests,
            rng,
        )
        self.acks = CumulativeAcks(reactor, self._send_ack)
        """Group acks, one ack:R per conversation for many messages (cim.client.acks)."""
        if seen_store is None:
            seen_store = FileSeenStore(seen_path) if seen_path else MemorySeenStore()
        self.inbox = Inbox(
            user,
            seen_store,
            self._deliver,
            self._acknowledge,
            self._fill,
            lambda conversation: self.catch_up.start(conversation),
            self._sending,
        )
        self.catch_up = CatchUp(
            reactor, self.answers, self.inbox, lambda: self.max_frame_size, ordered, rng=rng
        )
        self.corrections = Corrections()
        """The last messages handed over, with recalls and edits applied."""
        self.reads = ReadState(user)
        """Unread counts per conversation, the user's read marks, the peers' (✓✓)."""
        self.catch_up.bookkeeping = self.reads.summary
        if not receiving:
            self.inbox.close()
        # Application callbacks. on_message returning False declines the message: it is
        # not acknowledged, and the conversation's cursor stays below it.
        self.on_message: Callable[[cim_pb2.Message], object] = _decline
        self.on_state: Callable[[str, str], None] = lambda state, detail: None
        self.on_outcome: Callable[[DeliveryOutcome], None] = lambda outcome: None
        self.on_typing: Callable[[cim_pb2.TypingN], None] = lambda notice: None
        self.app_state = "foreground"
        """What the node is told on every connection (each starts in the foreground)."""
        # A recall or edit by someone else (or by this user on another device), in its
        # conversation's order; False declines it as on_message's False does.
        self.on_change: Callable[[Change], object] = _decline_change
        self.on_read: Callable[[ReadEvent], None] = lambda event: None
        """A READ_N: another device of the user read (its unread count dropped), or a
        1:1 peer read the user's messages up to a seq."""

    # --- the session's life -----------------------------------------------------------

    def start(self, deadline: float | None = None) -> Deferred[None]:
        """Fires when the session is online for the first time, or fails for good.

        With a ``deadline`` (seconds), a router or node that cannot be reached by then
        fails it with ``Unreachable`` naming which one and why, and the session stops:
        retrying is for a connection that was there, not for a daemon that is not.
        Without one, the first connection is retried like any reconnection.
        """
        waiter: Deferred[None] = Deferred()
        self._online_waiters.append(waiter)
        if deadline is not None:
            self.dialer.first_deadline(deadline)
        self.dialer.connect_soon(0)
        return waiter

    def stop_receiving(self) -> None:
        """Take no more messages: those not yet handed to ``on_message`` stay unacknowledged
        (the cursor stays below them), so the node keeps them for the next catch-up.

        Called from inside ``on_message``, the message being handed over was taken (it is
        acknowledged); to decline that one too, also return False from ``on_message``.
        """
        self.inbox.close()

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        self.on_state(state, detail)

    def _online(self, protocol: ImClientProtocol, where: str) -> None:
        """The dialer logged in on ``protocol``: resend, tell everyone, catch up."""
        self.protocol = protocol
        # Before anyone hears "online" (and sends more), so the resends keep their order.
        self.outbox.connection_made()
        self._set_state("online", where)
        waiters, self._online_waiters = self._online_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.app_state != "foreground":
            self._tell_app_state().addErrback(self._app_state_failed)
        if not self.inbox.closed:
            self.catch_up.start()

    def _give_up(self, why: str, error: type[SessionFailed] | None = None) -> None:
        self.stopping = True
        self.dialer.end_first_contact()
        self._set_state("stopped", why)
        self.outbox.fail_all(f"the session stopped: {why}")
        waiters, self._online_waiters = self._online_waiters, []
        for waiter in waiters:
            waiter.errback((error or SessionRefused)(why))

    async def stop(self, logout: bool = True) -> None:
        """Close the connection; with logout, also end the session at the router."""
        self.stopping = True
        self.dialer.end_first_contact()
        self.inbox.close()  # nothing more reaches the application, nor is acknowledged
        self.acks.flush()  # what it did take is acknowledged before the connection goes
        self.catch_up.stop()
        self.outbox.fail_all("the client stopped before an answer came")
        self.inbox.seen.close()
        self.dialer.cancel()
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.lose_connection()
        if logout:
            await self.dialer.logout()
        self.ticket = None

    # --- ConnectionEvents -------------------------------------------------------------

    def frame_received(self, frame_type: int, message: Any) -> None:
        if self.answers.answer(frame_type, message):
            return
        if frame_type == cim_pb2.MSG_N:
            # Straight to the inbox, never behind a request: only a gap in its own
            # conversation waits (for its fill or that conversation's catch-up).
            if not self.stopping:
                self.inbox.receive(message)
        elif frame_type == cim_pb2.MSG_A:
            self.outbox.taken(message)
            self.inbox.own(message.conversation, message.seq)
            self.reads.sent(message.conversation, message.seq)
        elif frame_type == cim_pb2.READ_N:
            self.on_read(self.reads.notice(message))
        elif frame_type == cim_pb2.ACK_N:
            self.outbox.acknowledged(message)
        elif frame_type == cim_pb2.TYPING_N:
            if not self.stopping:
                self.on_typing(message)
        elif frame_type == cim_pb2.OFFLINE_NOTICE:
            mark = self.inbox.watermark(message.conversation) if message.conversation else None
            if mark is None or message.seq > mark:
                self.catch_up.start(message.conversation or None)
        elif frame_type == cim_pb2.KICKED:
            self._kicked(message)
        elif frame_type == cim_pb2.GOING_AWAY:
            self.dialer.going_away = message.reconnect_after_ms / 1000
        elif frame_type == cim_pb2.ERROR and not self.answers.refused(message):
            self.outbox.refused(message)

    def _kicked(self, kicked: cim_pb2.Kicked) -> None:
        if self.stopping:
            return  # our own logout, or we already gave up
        if kicked.code == cim_pb2.Kicked.SESSION_EXPIRED:
            self.ticket = None  # log in again through the router, then reconnect
            return
        self._give_up(f"kicked: {kicked.reason}")

    def connection_closed(self, reason: Failure) -> None:
        protocol, self.protocol = self.protocol, None
        self.acks.forget()  # past the cursors: the next catch-up brings them again
        if protocol is None:
            return  # never got online; the dialer handles it
        self.outbox.connection_lost(REASON_CONNECTION_CLOSED)
        self.answers.connection_lost(reason)
        if self.stopping:
            if self.state != "stopped":
                self._set_state("offline")
            return
        self.dialer.reconnect()

    # --- receiving --------------------------------------------------------------------

    def _deliver(self, message: cim_pb2.Message) -> object:
        # The callbacks are looked up now: the application sets them later.
        change = change_of(message)
        if change is not None:
            taken = self.on_change(self.corrections.apply(change))
        else:
            self.corrections.remember(message)
            taken = self.on_message(message)
        if taken is not False:
            self.reads.received(message)
        return taken

    def _sending(self, message: cim_pb2.Message) -> bool:
        """Whether ``message`` is one this session sent and still waits to hear about."""
        return (
            getattr(message, "from") == self.user
            and message.device == self.device
            and self.outbox.is_waiting(message.client_seq)
        )

    def _acknowledge(self, message: cim_pb2.Message, through_seq: int) -> None:
        """ack:R: the application has ``message``, and the conversation up to
        ``through_seq`` (the node moves this device's cursor there); a group's is
        cumulative, one for many messages (cim.client.acks)."""
        if self.protocol is None:
            return  # the next catch-up acknowledges it by the cursor
        self.acks.acknowledge(message, through_seq)

    def _send_ack(self, ack: cim_pb2.AckR) -> None:
        if self.protocol is None:
            return  # the next catch-up acknowledges it by the cursor
        self.answers.ask(cim_pb2.ACK_R, ack).addErrback(self._ack_failed, ack.msg_id)

    def _ack_failed(self, failure: Failure, msg_id: int) -> None:
        # The cursor is only behind: the next catch-up's cursors move it.
        self.log.info("ack:R for {id} failed: {why}", id=msg_id, why=failure.getErrorMessage())

    def _fill(
        self, conversation: str, peer: str, group: str, after: int, before: int
    ) -> Deferred[cim_pb2.HistoryA]:
        """HISTORY_R for a gap in ``conversation``: the seqs between ``after`` and
        ``before``, newest first, one page."""
        request = cim_pb2.HistoryR(
            peer=peer, group=group, after=after, before=before, max_bytes=self.max_frame_size
        )
        return self.answers.history(request)

    def offline_summary(self) -> Deferred[cim_pb2.OfflineSummaryA]:
        """The catch-up summary (design: 优化方案1): unread per conversation, newest
        activity first. It also anchors the inbox's watermarks; it moves no cursor."""
        return Deferred.fromCoroutine(self.catch_up.summary())

    def history(
        self, peer_or_group: str, limit: int = 50, before: int = 0, group: bool = False
    ) -> Deferred[cim_pb2.HistoryA]:
        """One page of a conversation's timeline, newest first, whatever the cursors.

        ``group`` says ``peer_or_group`` is a group id. ``before`` is 0 for the newest
        page, else the previous answer's ``next_before`` (a seq). A refusal (not a
        participant: ``error == "forbidden"``) comes as an answer with ``error`` set,
        not a failure. These messages bypass the inbox: they are the record, not new
        arrivals, and reading them moves no cursor.
        """
        request = cim_pb2.HistoryR(before=before, limit=limit, max_bytes=self.max_frame_size)
        if group:
            request.group = peer_or_group
        else:
            request.peer = peer_or_group
        return self.answers.history(request)

    # --- recall and edit --------------------------------------------------------------

    def recall(self, msg_id: int) -> Deferred[Change]:
        """Recall one of this user's messages (within ``[im] recall_window``; a group's
        owner or admin: any message of the group). Fires with the change made; fails
        with ``RequestRefused`` (its ``reason``: unknown_message, not_yours, too_late,
        recalled) when the node refuses, and nothing changed then."""
        return self._change(cim_pb2.ChangeR(msg_id=msg_id, kind=cim_pb2.RECALL))

    def edit(self, msg_id: int, text: str) -> Deferred[Change]:
        """Replace the text of one of this user's text messages (within ``[im]
        edit_window``); refusals as ``recall``'s, and not_text."""
        return self._change(cim_pb2.ChangeR(msg_id=msg_id, kind=cim_pb2.EDIT, text=text))

    def _change(self, request: cim_pb2.ChangeR) -> Deferred[Change]:
        d = self.answers.change(request)
        return d.addCallback(self._changed, request)

    def _changed(self, answer: cim_pb2.ChangeA, request: cim_pb2.ChangeR) -> Change:
        """The change is in the timeline: its entry's place is dealt with here (as a
        msg:A's), and what this device was handed reads as changed."""
        self.inbox.own(answer.conversation, answer.seq)
        change = Change(
            EVENTS[answer.kind],
            answer.msg_id,
            answer.conversation,
            answer.replaces_seq,
            self.user,
            request.text,
            answer.changed_at_ms,
            answer.entry_id,
            answer.seq,
        )
        return self.corrections.apply(change)

    # --- read marks -------------------------------------------------------------------

    def mark_read(self, conversation: str, seq: int | None = None) -> Deferred[cim_pb2.ReadA]:
        """Mark ``conversation`` (a timeline key, ``Message.conversation``) read up to
        ``seq``, or (None) up to the newest message this device has there. Fires with
        READ_A (the mark in effect: a lower ``seq`` changes nothing); a seq past the
        end or a conversation not the user's fails with ``RequestRefused``. The user's
        other devices and a 1:1 peer hear of it (READ_N), the peer only while the
        user's read receipts are on."""
        if seq is None:
            seq = self.reads.newest(conversation)
        if seq <= 0:
            return fail(ValueError(f"nothing to mark read in {conversation!r} yet"))
        request = cim_pb2.ReadR(conversation=conversation, seq=seq)
        d: Deferred[cim_pb2.ReadA] = self.answers.ask(cim_pb2.READ_R, request)

        def marked(answer: cim_pb2.ReadA) -> cim_pb2.ReadA:
            self.reads.marked(answer)
            return answer

        return d.addCallback(marked)

    def readers(self, conversation: str, seq: int) -> Deferred[cim_pb2.ReadersA]:
        """Who has read message ``seq`` of a conversation (its sender asks: anyone
        else is refused): the count, the names, the members it could count."""
        request = cim_pb2.ReadersR(conversation=conversation, seq=seq)
        d: Deferred[cim_pb2.ReadersA] = self.answers.ask(cim_pb2.READERS_R, request)
        return d

    # --- other requests ---------------------------------------------------------------

    def online(self, offset: int = 0, limit: int = 100) -> Deferred[cim_pb2.OnlineA]:
        return self.answers.online(offset, limit)

    def devices(self) -> Deferred[cim_pb2.DevicesA]:
        """This user's devices online now (this one among them, ``this_device``)."""
        return self.answers.devices()

    def group_request(self, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        """Send a GROUP_R (create, rename, add, remove, leave, ...) and get its answer."""
        return self.answers.group(request)

    def contacts_request(
        self, request: cim_pb2.ContactsRequest
    ) -> Deferred[cim_pb2.ContactsAnswer]:
        """Send a CONTACTS_R (list, request, accept, block, settings, ...), get its answer."""
        return self.answers.contacts(request)

    # --- the app's state and typing ---------------------------------------------------

    def set_app_state(self, state: str) -> Deferred[cim_pb2.AppStateA | None]:
        """The app went to the "foreground" or the "background": the node's idle timeout
        and this connection's heartbeat follow (``[im] background_heartbeat_interval``).

        Remembered for every later connection. Fires with the node's answer, or None
        while offline (the next connection tells it); fails if the node refuses.
        """
        if state not in APP_STATES:
            raise ValueError(f"app state is one of {', '.join(APP_STATES)}, not {state!r}")
        self.app_state = state
        if self.protocol is None:
            return succeed(None)
        return self._tell_app_state()

    def _tell_app_state(self) -> Deferred[cim_pb2.AppStateA | None]:
        request = cim_pb2.AppStateR(state=APP_STATES[self.app_state])
        d: Deferred[Any] = self.answers.ask(cim_pb2.APP_STATE_R, request)
        d.addCallback(self._app_state_answered)
        return d

    def _app_state_answered(self, answer: cim_pb2.AppStateA) -> cim_pb2.AppStateA:
        protocol = self.protocol
        if protocol is not None and answer.heartbeat_interval_ms:
            protocol.set_heartbeat(
                answer.heartbeat_interval_ms / 1000, answer.heartbeat_timeout_ms / 1000
            )
        return answer

    def _app_state_failed(self, failure: Failure) -> None:
        # The connection keeps the foreground's heartbeat: more often, never too late.
        self.log.info("telling the app state failed: {why}", why=failure.getErrorMessage())

    def typing(
        self, to: str = "", group: str = "", stopped: bool = False
    ) -> Deferred[cim_pb2.TypingA]:
        """Tell ``to`` (or the group's other members) that this user is typing, or has
        stopped. The node passes on one per conversation every 3 s: the answer's
        ``dropped`` says this one was over that. A refusal (the receiver does not accept
        you, not a member) fails with ``RequestRefused``."""
        state = cim_pb2.TYPING_STOPPED if stopped else cim_pb2.TYPING_STARTED
        request = cim_pb2.TypingR(to=to, group=group, state=state)
        # Not repeated after its deadline: a late "typing" is worse than none.
        return self.answers.ask(cim_pb2.TYPING_R, request, retry_on_deadline=False)

    def push_request(self, request: cim_pb2.PushRequest) -> Deferred[cim_pb2.PushAnswer]:
        """Send a PUSH_R (register, remove, show this device's push registration)."""
        return self.answers.push(request)

    # --- sending ----------------------------------------------------------------------

    def _transmit(self, message: cim_pb2.Message) -> bool:
        if self.protocol is None:
            return False
        self.protocol.send(cim_pb2.MSG_R, message)
        return True

    def send_text(self, to: str, text: str) -> Deferred[DeliveryOutcome]:
        """Send a text; fires with its outcome once it is known (see send_message)."""
        return self.send_message(cim_pb2.Message(to=to, text=text))

    def send_group(self, group_id: str, text: str) -> Deferred[DeliveryOutcome]:
        """Post a text to a group; the outcome is "accepted" once the node took it."""
        return self.send_message(cim_pb2.Message(group=group_id, text=text))

    def send_message(self, message: cim_pb2.Message) -> Deferred[DeliveryOutcome]:
        """Send any user message (text, media, location, group); the library numbers it.

        Fires once with the outcome: delivered, stored, accepted (group) or failed with
        a reason; the Deferred never fails. While the session is reconnecting, ``auto``
        keeps the message for the new connection and ``manual`` fails it at once.
        """
        client_seq = self._next_seq
        self._next_seq += 1
        message.client_seq = client_seq
        message.client_time_ms = int(self.reactor.seconds() * 1000)
        conversation = ("group", message.group) if message.group else ("user", message.to)
        message.prev_seq = self._last_seq_to.get(conversation, 0)
        self._last_seq_to[conversation] = client_seq
        refuse = None
        if self.protocol is None and (self.stopping or self.state in ("offline", "stopped")):
            refuse = f"not connected ({self.state})"
        return self.outbox.add(message, refuse)

    def resend(self, client_seq: int) -> Deferred[DeliveryOutcome]:
        """Send a failed (or still waiting) message again with the same client_seq.

        The node answers a repeated msg:R with the same server id and the receiver
        shows it once, so this is safe whatever became of the first try. Raises
        KeyError for a sequence that is neither waiting nor among the recent failures.
        """
        return self.outbox.resend(client_seq)
