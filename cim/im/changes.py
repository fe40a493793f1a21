"""CHANGE_R: recall and edit a sent message (#15).

The sender recalls a message within ``[im] recall_window`` or edits a text within
``[im] edit_window``; a group's owner or admin recalls any message of the group, at
any time. The change is checked and made in one transaction
(``cim.storage.changes``): an entry of its own in the message's timeline (a Message
with ``change`` and ``replaces`` set, numbered like any message) and the stored
message rewritten (recalled: its content gone; edited: the newest text, marked). Only
then is the requester answered CHANGE_A (the entry's conversation and seq, which its
device counts as dealt with, as msg:A), and the entry goes out live as MSG_N to every
other device of both sides of a 1:1 conversation, or of every member of a group:
those connected here directly, those connected to other nodes over the bus in one
delivery per node (``Routing.forward``; the receiving node hands it over without
holding an ack, as a group copy). A copy that cannot go is dropped: the entry is past
every device's cursor, so its next catch-up brings it. ack:R of an entry moves the
cursor like any message's.

Bad values are answered ERROR with ``request_type`` CHANGE_R, the request's id and a
machine-readable ``reason`` (docs/protocol.md), and change nothing. A change counts in
its sender's message rate (``[limits] messages``), as the entry it makes is one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.content import control_characters_in
from cim.history.timeline import TimelineUnavailable
from cim.im.collaborators import (
    Bounds,
    ClientSession,
    Connected,
    Directory,
    FrameTable,
    NodeCore,
    Stores,
    in_background,
    log_failure,
)
from cim.im.peers import Peers
from cim.im.routing import Routing
from cim.interfaces import BusUnavailable, StateUnavailable
from cim.limits.messages import MessageGate, retry_after_ms
from cim.protocols import cim_pb2
from cim.storage.changes import NOT_YOURS, ChangeAsked, ChangeMade, ChangeRefused

__all__ = ["BAD_CHANGE", "MessageChanges"]

CHANGE_A = cim_pb2.CHANGE_A
CHANGE_R = cim_pb2.CHANGE_R
MSG_N = cim_pb2.MSG_N
ERROR = cim_pb2.ERROR
BAD_REQUEST = cim_pb2.Error.BAD_REQUEST
FORBIDDEN = cim_pb2.Error.FORBIDDEN
UNAVAILABLE = cim_pb2.Error.UNAVAILABLE
RATE_LIMITED = cim_pb2.Error.RATE_LIMITED

BAD_CHANGE = "bad_request"
"""The ERROR reason of a malformed CHANGE_R (no message named, no kind, bad text)."""

UNAVAILABLE_RETRY_MS = 1000
"""How soon a device asks again when the timeline could not be written."""

_KINDS = {cim_pb2.RECALL: "recalled", cim_pb2.EDIT: "edited"}

_AS_A_MESSAGE = cim_pb2.Message(to="@change")
"""What the message gate is shown for a change: no group, no client_seq (nothing to
hold in order), so only the sender's rate and the store's backlog apply."""


class MessageChanges:
    """Answers CHANGE_R and spreads its entry to the devices that show the message."""

    log = Logger()

    def __init__(
        self,
        core: NodeCore,
        directory: Directory,
        stores: Stores,
        peers: Peers,
        connected: Connected,
        routing: Routing,
        gate: MessageGate,
        bounds: Bounds,
    ) -> None:
        self._node_id = core.node_id
        self._clock = core.clock
        self._ids = core.message_ids
        self._metrics = core.metrics
        self._directory = directory
        self._stores = stores
        self._peers = peers
        self._connected = connected
        self._routing = routing
        self._gate = gate
        self._bounds = bounds

    def frame_table(self) -> FrameTable:
        return {CHANGE_R: (cim_pb2.ChangeR, self.change_requested)}

    # --- CHANGE_R ---------------------------------------------------------------------

    def problem(self, request: cim_pb2.ChangeR) -> str | None:
        """Why a CHANGE_R is malformed whatever the message it names, or None."""
        if not request.msg_id:
            return "name the message to change (msg_id)"
        if request.kind not in _KINDS:
            return "kind must be RECALL or EDIT"
        if request.kind == cim_pb2.EDIT:
            if not request.text.strip():
                return "an edit needs the new text (to remove a message, recall it)"
            if len(request.text) > self._bounds.max_text_length:
                return f"a message text holds at most {self._bounds.max_text_length} characters"
            if control_characters_in(request.text):
                return "text may not contain control characters (newline and tab are fine)"
        elif request.text:
            return "a recall carries no text"
        return None

    def change_requested(self, session: ClientSession, request: cim_pb2.ChangeR) -> None:
        """CHANGE_R. The actor is the connection's user, whatever the frame says."""
        problem = self.problem(request)
        if problem is not None:
            self._refuse(session, request, BAD_REQUEST, BAD_CHANGE, problem)
            return
        record = session.record
        # Each change is an entry like a message: it counts in the sender's message
        # rate, and waits while the timeline's writer is behind (cim.limits).
        refusal = self._gate.check(record.user, record.device, _AS_A_MESSAGE)
        if refusal is not None:
            reason = "rate_limited" if refusal.code == RATE_LIMITED else "unavailable"
            retry = retry_after_ms(refusal.retry_after)
            self._refuse(session, request, refusal.code, reason, refusal.text, retry)
            return
        asked = ChangeAsked(
            actor=record.user,
            device=record.device,
            msg_id=request.msg_id,
            kind=request.kind,
            text=request.text,
            entry_id=self._ids.next_id(),
            now=self._clock.seconds(),
            recall_window=self._bounds.recall_window,
            edit_window=self._bounds.edit_window,
        )
        d = self._stores.timeline.change(asked)
        d.addCallback(self._made, session, request)
        d.addErrback(self._failed, session, request)

    def _made(self, made: ChangeMade, session: ClientSession, request: cim_pb2.ChangeR) -> None:
        entry = made.entry
        session.deliver(
            CHANGE_A,
            cim_pb2.ChangeA(
                request_id=request.request_id,
                msg_id=entry.replaces,
                kind=entry.change,
                conversation=entry.conversation,
                seq=entry.seq,
                entry_id=entry.id,
                changed_at_ms=entry.changed_at_ms,
                replaces_seq=entry.replaces_seq,
            ),
        )
        self._metrics.messages[_KINDS[entry.change]] += 1
        in_background(self._spread(made, session), self.log, "spread a change")

    def _failed(self, failure: Failure, session: ClientSession, request: cim_pb2.ChangeR) -> None:
        refused = failure.check(ChangeRefused)
        if refused is not None:
            exc: Any = failure.value
            code = FORBIDDEN if exc.reason == NOT_YOURS else BAD_REQUEST
            self._refuse(session, request, code, exc.reason, exc.message)
            return
        if not failure.check(TimelineUnavailable):
            log_failure(failure, self.log, "change a message")
        self._refuse(
            session,
            request,
            UNAVAILABLE,
            "unavailable",
            "the node cannot change messages right now; retry",
            UNAVAILABLE_RETRY_MS,
        )

    def _refuse(
        self,
        session: ClientSession,
        request: cim_pb2.ChangeR,
        code: Any,
        reason: str,
        text: str,
        retry_ms: int = 0,
    ) -> None:
        session.deliver(
            ERROR,
            cim_pb2.Error(
                code=code,
                message=text,
                request_type=CHANGE_R,
                request_id=request.request_id,
                reason=reason,
                retry_after_ms=retry_ms,
            ),
        )

    # --- live copies ------------------------------------------------------------------

    def _spread(self, made: ChangeMade, requester: ClientSession) -> Deferred[None]:
        return Deferred.fromCoroutine(self._spread_entry(made, requester))

    async def _spread_entry(self, made: ChangeMade, requester: ClientSession) -> None:
        """The entry to every session of the conversation's users but the requester's:
        here directly, elsewhere over the bus; the rest catch up."""
        entry = made.entry
        users = list(made.parties)
        if entry.group:
            users = await self._directory.groups.member_names(entry.group)
        elsewhere: list[str] = []
        for user in users:
            sessions = self._connected.devices_of(user)
            if not sessions:
                elsewhere.append(user)
            for session in sessions:
                if session is requester:
                    continue
                if session.may_take_live_copy():
                    session.deliver(MSG_N, entry)
                # else: behind on reading, it is told to pull once its queue drains.
        if not elsewhere:
            return
        try:
            routes = await self._peers.nodes_of(elsewhere)
        except StateUnavailable:
            return  # nowhere to send it: each device catches up from its cursor
        by_node: dict[str, list[str]] = {}
        for user in elsewhere:
            node = routes.get(user)
            if node is not None and node != self._node_id and self._peers.is_alive(node):
                by_node.setdefault(node, []).append(user)
        for node, receivers in sorted(by_node.items()):
            try:
                await self._routing.forward(node, entry, receivers, entry.device)
            except BusUnavailable as exc:
                # Not lost: the entry is past their cursors, their next catch-up has it.
                self.log.info(
                    "change {id} not sent to node {node}: {why}", id=entry.id, node=node, why=exc
                )
