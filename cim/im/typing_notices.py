"""TYPING_R: "typing" / "stopped" in a conversation, to the other side's online devices.

A notice is live only: nothing is stored, nothing is retried, a device offline never
hears it. It goes to the receiver's online devices in a 1:1 conversation, to the other
members' online devices in a group, never to the sender; users connected to other
nodes get it over the bus (``BusTyping``, one envelope per node, the way group copies
travel). The sender is the connection's user, whatever the frame says.

At most one notice per device and conversation every ``TYPING_INTERVAL`` seconds goes
on: a token bucket per (user, device, conversation) from ``cim.limits.buckets``,
which forgets idle keys; the excess is dropped (answered ``dropped`` when the request
asked for an answer). Keyed by device rather than by connection, a reconnect does not
reset it.

Consent is msg:R's (``cim.im.direct``): typing to someone who does not accept your
messages is ERROR ``FORBIDDEN`` with the same reason, to a group you are not in ERROR
``BAD_REQUEST``; a refused notice goes nowhere.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.history.store import direct_conversation, group_conversation
from cim.im.collaborators import (
    ClientSession,
    Connected,
    Directory,
    FrameTable,
    NodeCore,
    log_failure,
)
from cim.im.direct import REASON_NOT_ACCEPTED
from cim.im.peers import Peers
from cim.interfaces import BusUnavailable, StateUnavailable
from cim.limits.buckets import Rate, TokenBuckets
from cim.protocols import cim_pb2

__all__ = ["TYPING_INTERVAL", "TypingNotices"]

TYPING_N = cim_pb2.TYPING_N
TYPING_A = cim_pb2.TYPING_A
ERROR = cim_pb2.ERROR
BAD_REQUEST = cim_pb2.Error.BAD_REQUEST
FORBIDDEN = cim_pb2.Error.FORBIDDEN
INTERNAL = cim_pb2.Error.INTERNAL
_STATES = frozenset((cim_pb2.TYPING_STARTED, cim_pb2.TYPING_STOPPED))

TYPING_INTERVAL = 3.0
"""Seconds between two notices of one device in one conversation that go on."""

REASON_NOT_MEMBER = "only members can type in a group"


class TypingNotices:
    """Answers TYPING_R; gives notices from other nodes to the users connected here."""

    log = Logger()

    def __init__(
        self, core: NodeCore, directory: Directory, peers: Peers, connected: Connected
    ) -> None:
        self._node_id = core.node_id
        self._directory = directory
        self._peers = peers
        self._connected = connected
        self.throttle = TokenBuckets(core.clock, Rate(1 / TYPING_INTERVAL, 1))
        """One notice per device and conversation every TYPING_INTERVAL seconds."""

    def frame_table(self) -> FrameTable:
        return {cim_pb2.TYPING_R: (cim_pb2.TypingR, self.typing_received)}

    # --- TYPING_R ---------------------------------------------------------------------

    def typing_received(self, session: ClientSession, request: cim_pb2.TypingR) -> None:
        record = session.record
        problem = _problem(request, record.user)
        if problem is not None:
            self._refuse(session, request, BAD_REQUEST, problem)
            return
        if request.group:
            conversation = group_conversation(request.group)
        else:
            conversation = direct_conversation(record.user, request.to)
        # Before any lookup: a flood of notices costs a dict entry, not a database read.
        if self.throttle.take((record.user, record.device, conversation)) > 0:
            if request.request_id:
                session.deliver(
                    TYPING_A, cim_pb2.TypingA(request_id=request.request_id, dropped=True)
                )
            return
        notice = cim_pb2.TypingN(
            device=record.device,
            to=request.to,
            group=request.group,
            state=request.state,
            conversation=conversation,
        )
        setattr(notice, "from", record.user)
        d = Deferred.fromCoroutine(self._pass_on(session, request, notice))
        d.addErrback(self._failed, session, request)

    def _failed(self, failure: Failure, session: ClientSession, request: cim_pb2.TypingR) -> None:
        """A lookup failed (the database, the state store): logged, and said, so a
        client waiting for its answer is not left to its deadline."""
        log_failure(failure, self.log, "pass a typing notice on")
        self._refuse(session, request, INTERNAL, "the node could not pass the notice on")

    async def _pass_on(
        self, session: ClientSession, request: cim_pb2.TypingR, notice: cim_pb2.TypingN
    ) -> None:
        sender = session.record.user
        if request.group:
            if not await self._directory.groups.is_member(request.group, sender):
                self._refuse(session, request, BAD_REQUEST, REASON_NOT_MEMBER)
                return
            names = await self._directory.groups.member_names(request.group)
            receivers = [name for name in names if name != sender]
        else:
            contacts = self._directory.contacts
            allowed = contacts.known(sender, request.to)
            if allowed is None:
                allowed = await contacts.may_message(sender, request.to)
            if not allowed:
                self._refuse(session, request, FORBIDDEN, REASON_NOT_ACCEPTED)
                return
            receivers = [request.to]
        if request.request_id:
            session.deliver(TYPING_A, cim_pb2.TypingA(request_id=request.request_id))
        elsewhere = [user for user in receivers if not self._give(user, notice)]
        if elsewhere:
            await self._forward(elsewhere, notice)

    def _give(self, user: str, notice: cim_pb2.TypingN) -> bool:
        """The notice to the user's sessions here; False if it has none here."""
        sessions = self._connected.devices_of(user)
        for session in sessions:
            # A client behind on reading would only queue a notice that is stale
            # by the time it reads it.
            if session.may_take_live_copy():
                session.deliver(TYPING_N, notice)
        return bool(sessions)

    async def _forward(self, users: list[str], notice: cim_pb2.TypingN) -> None:
        """One envelope per node holding some of ``users``; best effort: a notice
        that cannot go is not worth a retry."""
        try:
            routes = await self._peers.nodes_of(users)
        except StateUnavailable:
            return
        by_node: dict[str, list[str]] = {}
        for user, node in routes.items():
            if node != self._node_id and self._peers.is_alive(node):
                by_node.setdefault(node, []).append(user)
        for node, receivers in by_node.items():
            envelope = cim_pb2.BusEnvelope(
                origin_node=self._node_id,
                typing=cim_pb2.BusTyping(notice=notice, receivers=receivers),
            )
            d = self._peers.publish(node, envelope)
            d.addErrback(self._not_forwarded, node)

    def _not_forwarded(self, failure: Failure, node: str) -> None:
        if not failure.check(BusUnavailable):
            log_failure(failure, self.log, f"forward a typing notice to {node}")

    # --- from other nodes -------------------------------------------------------------

    def bus_typing_received(self, typing: cim_pb2.BusTyping) -> None:
        """Another node's notice for users connected here (gone since: dropped)."""
        for user in typing.receivers:
            self._give(user, typing.notice)

    def _refuse(
        self, session: ClientSession, request: cim_pb2.TypingR, code: Any, text: str
    ) -> None:
        session.deliver(
            ERROR,
            cim_pb2.Error(
                code=code,
                message=text,
                request_type=cim_pb2.TYPING_R,
                request_id=request.request_id,
            ),
        )


def _problem(request: cim_pb2.TypingR, sender: str) -> str | None:
    """Why a TYPING_R is refused before anything is looked up, or None."""
    if bool(request.to) == bool(request.group):
        return "a typing notice goes to a user ('to') or a group ('group'), exactly one"
    if request.state not in _STATES:
        return "state must be TYPING_STARTED or TYPING_STOPPED"
    if request.to == sender:
        return "a typing notice goes to someone else"
    return None
