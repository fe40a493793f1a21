"""Catching up on a device's timelines (design: offline:R / offline:A / offlineack:R,
方案2, and the summary first, 优化方案1).

A device asks for the summary (OFFLINE_SUMMARY_R): in ONE frame, every conversation
with messages past its cursor (count, last seq, cursor, newest message; the newest
text cut when the frame needs room), newest activity first, and the cursors of its
other conversations (``caught_up``), so a live message can be placed at once. It then
pulls pages (OFFLINE_R) newest first, of one conversation (by seq) or across all (by
message id), each pull carrying the cursors of what it now has (``acks``), and ends
with OFFLINE_ACK_R. Pages are bounded in count and in bytes: below the node's frame
limit and the client's own (``max_bytes``); one message larger than that comes alone.

Every request's ``request_id`` is echoed; a request the node cannot answer now (the
database is down) gets ERROR ``UNAVAILABLE`` with the request's type and id, never
silence.

When a device's timeline moved while no live copy reached it (it moved to another
node while the copy travelled, or logged in while it was written), it is told to pull
(OFFLINE_NOTICE with the conversation and seq), here or over the bus.
"""

from __future__ import annotations

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.history.service import message_of, page_messages
from cim.history.timeline import TimelineUnavailable
from cim.im.collaborators import (
    ClientSession,
    Connected,
    FrameTable,
    NodeCore,
    Stores,
    log_failure,
)
from cim.im.peers import Peers
from cim.interfaces import BusUnavailable, StateUnavailable
from cim.offline.store import page_budget
from cim.protocols import cim_pb2
from cim.storage.timeline import ConversationState

__all__ = ["MAX_OFFLINE_PAGE", "UNAVAILABLE_RETRY_MS", "Catchup", "summary_frame"]

OFFLINE_A = cim_pb2.OFFLINE_A
OFFLINE_ACK_A = cim_pb2.OFFLINE_ACK_A
OFFLINE_SUMMARY_A = cim_pb2.OFFLINE_SUMMARY_A
OFFLINE_NOTICE = cim_pb2.OFFLINE_NOTICE
ERROR = cim_pb2.ERROR
MAX_OFFLINE_PAGE = 1000
UNAVAILABLE_RETRY_MS = 1000
"""How soon a device asks again after the node could not answer."""

_MAX_ID = (1 << 63) - 1
_CUT_TEXT = 64
"""Characters of a newest message's text kept when the summary needs room."""


def _entry_cost(entry: ProtobufMessage) -> int:
    """Bytes a repeated entry adds to its message: the entry, its tag and length."""
    size = entry.ByteSize()
    return size + 1 + (1 if size < 128 else 2 if size < 16384 else 3)


def summary_frame(
    states: list[ConversationState], max_bytes: int, request_id: int
) -> cim_pb2.OfflineSummaryA:
    """The summary in one frame below ``max_bytes``: conversations with unread first
    (newest activity first), their newest text cut when the whole does not fit, then
    the caught-up cursors and the peers' read marks there while room remains; ``more``
    when something was left out. Counts are past the device's read point, which the
    user's read mark raises (cim.storage.read_marks).

    Sizes are added up entry by entry (never the whole frame again per entry), so a
    user with thousands of conversations costs one pass."""
    unread = [state for state in states if state.unread and state.newest is not None]
    entries = []
    for state in unread:
        entry = cim_pb2.ConversationSummary(
            conversation=state.conversation,
            peer=state.peer or "",
            group=state.group_id or "",
            count=min(state.unread, 0xFFFFFFFF),
            last_seq=state.last_seq,
            cursor=state.cursor,
            read_seq=state.read,
            peer_read_seq=state.peer_read,
        )
        assert state.newest is not None
        entry.newest.CopyFrom(message_of(state.newest))
        entries.append(entry)
    total = min(sum(state.unread for state in unread), 0xFFFFFFFF)
    answer = cim_pb2.OfflineSummaryA(request_id=request_id, total=total, more=True)
    room = max_bytes - answer.ByteSize()  # ``more`` counted: it may be needed
    costs = [_entry_cost(entry) for entry in entries]
    if sum(costs) > room:  # the newest texts give way first
        for entry in entries:
            if len(entry.newest.text) > _CUT_TEXT or entry.newest.HasField("media"):
                entry.newest.text = entry.newest.text[:_CUT_TEXT]
                entry.newest.ClearField("media")
                entry.newest_cut = True
        costs = [_entry_cost(entry) for entry in entries]
    kept = 0
    for cost in costs:
        if cost > room:
            break  # the oldest activity waits for the next frame
        room -= cost
        kept += 1
    answer.conversations.extend(entries[:kept])
    left_out = kept < len(entries)
    for state in states:
        if state.unread:
            continue
        mark = cim_pb2.Cursor(conversation=state.conversation, seq=state.cursor)
        cost = _entry_cost(mark)
        if cost > room:
            left_out = True
            break
        room -= cost
        answer.caught_up.append(mark)
    for state in states:  # how far 1:1 peers read, where no entry says it
        if state.unread or not state.peer_read or left_out:
            continue
        mark = cim_pb2.Cursor(conversation=state.conversation, seq=state.peer_read)
        cost = _entry_cost(mark)
        if cost > room:
            left_out = True
            break
        room -= cost
        answer.peer_reads.append(mark)
    answer.more = left_out
    return answer


class Catchup:
    """OFFLINE_SUMMARY_R, OFFLINE_R, OFFLINE_ACK_R, and the notice to pull."""

    log = Logger()

    def __init__(self, core: NodeCore, stores: Stores, peers: Peers, connected: Connected) -> None:
        self._node_id = core.node_id
        self._clock = core.clock
        self._stores = stores
        self._peers = peers
        self._connected = connected
        self._to_look_up: dict[str, dict[str, int]] = {}
        """Receivers not connected here whose timeline moved this turn: conversation ->
        its highest seq, for one lookup of where they are at the end of the turn."""
        self._looking: list[Deferred[None]] = []
        self._look_up_turn: IDelayedCall | None = None

    def frame_table(self) -> FrameTable:
        return {
            cim_pb2.OFFLINE_R: (cim_pb2.OfflineR, self.offline_requested),
            cim_pb2.OFFLINE_ACK_R: (cim_pb2.OfflineAckR, self.offline_acknowledged),
            cim_pb2.OFFLINE_SUMMARY_R: (cim_pb2.OfflineSummaryR, self.summary_requested),
        }

    # --- the device's questions -------------------------------------------------------

    def summary_requested(self, session: ClientSession, request: cim_pb2.OfflineSummaryR) -> None:
        record = session.record
        budget = page_budget(self._stores.max_page_bytes, request.max_bytes)
        d = self._stores.timeline.summary(record.user, record.device)
        d.addCallback(
            lambda states: session.deliver(
                OFFLINE_SUMMARY_A, summary_frame(states, budget, request.request_id)
            )
        )
        d.addErrback(self._unavailable, session, cim_pb2.OFFLINE_SUMMARY_R, request.request_id)

    def offline_requested(self, session: ClientSession, request: cim_pb2.OfflineR) -> None:
        """A page past the device's cursor; the cursors in ``acks`` move first."""
        timeline = self._stores.timeline
        record = session.record
        limit = min(request.limit or self._stores.offline_page_size, MAX_OFFLINE_PAGE)
        budget = page_budget(self._stores.max_page_bytes, request.max_bytes)
        before = request.before if 0 < request.before <= _MAX_ID else None

        async def answer() -> None:
            moved = 0
            if request.acks:
                moved = await timeline.move_cursors(record.user, record.device, request.acks)
            page = await timeline.unread_page(
                record.user, record.device, request.conversation, before, limit, budget
            )
            session.deliver(
                OFFLINE_A,
                cim_pb2.OfflineA(
                    messages=page_messages(page),
                    more=page.more,
                    next_before=page.next_before,
                    acknowledged=moved,
                    conversation=request.conversation,
                    request_id=request.request_id,
                ),
            )

        d = Deferred.fromCoroutine(answer())
        d.addErrback(self._unavailable, session, cim_pb2.OFFLINE_R, request.request_id)

    def offline_acknowledged(self, session: ClientSession, request: cim_pb2.OfflineAckR) -> None:
        record = session.record
        d = self._stores.timeline.move_cursors(record.user, record.device, request.cursors)
        d.addCallback(
            lambda count: session.deliver(
                OFFLINE_ACK_A,
                cim_pb2.OfflineAckA(acknowledged=count, request_id=request.request_id),
            )
        )
        d.addErrback(self._unavailable, session, cim_pb2.OFFLINE_ACK_R, request.request_id)

    def _unavailable(
        self, failure: Failure, session: ClientSession, request_type: int, request_id: int
    ) -> None:
        """The one answer to a request the node cannot serve now: never silence."""
        if not failure.check(TimelineUnavailable):
            self.log.warn(
                "could not answer a catch-up request ({why})", why=failure.getErrorMessage()
            )
        session.deliver(
            ERROR,
            cim_pb2.Error(
                code=cim_pb2.Error.UNAVAILABLE,
                message="messages cannot be read right now; ask again",
                request_type=request_type,  # type: ignore[arg-type]
                request_id=request_id,
                retry_after_ms=UNAVAILABLE_RETRY_MS,
            ),
        )

    # --- telling devices to pull ------------------------------------------------------

    def notify_stored(self, receivers: list[str], conversation: str = "", seq: int = 0) -> None:
        """Users connected here whose timeline moved without a live copy: every device
        of them pulls."""
        for receiver in receivers:
            for session in self._connected.devices_of(receiver):
                session.deliver(
                    OFFLINE_NOTICE, cim_pb2.OfflineNotice(conversation=conversation, seq=seq)
                )

    def stored_for(
        self, receivers: list[str], conversation: str = "", seq: int = 0
    ) -> Deferred[None]:
        """These users' timeline moved while no live copy reached them: those connected
        anywhere are told to pull (design: no gap)."""
        connected = self._connected
        here = [user for user in receivers if user in connected]
        self.notify_stored(here, conversation, seq)
        elsewhere = [user for user in receivers if user not in connected]
        if not elsewhere:
            return succeed(None)
        # Where they are is read once for the whole turn, after every store of the
        # turn (so it still finds a receiver who connected meanwhile): eight senders
        # writing to one offline user made one lookup per message (docs/benchmarks.md).
        to_look_up = self._to_look_up
        for user in elsewhere:
            seqs = to_look_up.setdefault(user, {})
            if seq >= seqs.get(conversation, 0):
                seqs[conversation] = seq
        done: Deferred[None] = Deferred()
        self._looking.append(done)
        if self._look_up_turn is None:
            self._look_up_turn = self._clock.callLater(0, self._look_up)
        return done

    def _look_up(self) -> None:
        self._look_up_turn = None
        wanted, self._to_look_up = self._to_look_up, {}
        waiting, self._looking = self._looking, []
        d: Deferred[None] = self._peers.nodes_of(list(wanted)).addCallback(
            self._tell_their_nodes, wanted
        )
        # Not telling is not losing: the receiver's next pull finds the messages.
        d.addErrback(lambda failure: failure.trap(BusUnavailable, StateUnavailable))
        d.addErrback(log_failure, self.log, "tell receivers to pull")

        def answer(_: object) -> None:
            for each in waiting:
                each.callback(None)

        d.addBoth(answer)

    def _tell_their_nodes(
        self, routes: dict[str, str], wanted: dict[str, dict[str, int]]
    ) -> Deferred[None] | None:
        """Each live node other than this one holding some of them hears once per
        conversation, with its newest seq. Most receivers of a stored message are
        offline everywhere: no route, no work."""
        peers = self._peers
        by_node: dict[tuple[str, str, int], list[str]] = {}
        for user, node in routes.items():
            if node != self._node_id and peers.is_alive(node):
                for conversation, seq in wanted.get(user, {}).items():
                    by_node.setdefault((node, conversation, seq), []).append(user)
        if not by_node:
            return None

        async def tell() -> None:
            for (node, conversation, seq), users in by_node.items():
                envelope = cim_pb2.BusEnvelope(
                    origin_node=self._node_id,
                    stored=cim_pb2.OfflineReady(
                        receivers=users, conversation=conversation, seq=seq
                    ),
                )
                await peers.publish(node, envelope)

        return Deferred.fromCoroutine(tell())
