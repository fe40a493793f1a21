"""Group messages: who may post, and live copies in order; and GROUP_R requests.

A group post arrives as msg:R (``cim.im.direct`` takes it); only a member may post.
Once claimed it is appended to the group's timeline, ONE row whatever the number of
members, numbered there (its seq: every member shows that order); only then does the
sender hear "accepted", and live copies go to every device of the members online (the
sender's other devices too, never the one it posted from): those connected here
directly, in slices so a big group does not stall other users; those on other nodes in
one bus message per node. Nothing is written per member: a copy that cannot
go is dropped, since every member catches up from its cursor. Messages of one group
fan out one after another, in the order they were appended; each is serialized once
and only sealed per connection. Once a backlog forms, up to ``FANOUT_BATCH`` queued
messages go together, a connection getting them in one write. Members acknowledge
cumulatively (docs/protocol.md), and nothing here waits for their acks.

The fan-out backlog is bounded (``[limits] group_backlog`` messages per group,
``fanout_backlog`` deliveries and ``fanout_backlog_bytes`` for all groups): past it,
``backlog_refusal`` tells the take path (``cim.limits.messages``) to refuse new posts
before they are accepted, so nothing accepted waits longer than the bound allows and
nothing is accepted and then lost. A group's deliveries are its messages times its
last known member count (1 until its first fan-out here).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import islice

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from cim.im.collaborators import (
    Bounds,
    ClientSession,
    Connected,
    Directory,
    FrameTable,
    NodeCore,
    log_failure,
)
from cim.im.peers import Peers
from cim.im.routing import Routing
from cim.interfaces import BusUnavailable, StateUnavailable
from cim.limits.messages import Refusal
from cim.protocols import cim_pb2
from cim.protocols.wire import encode_frame

__all__ = ["FANOUT_SLICE", "GroupMessages"]

MSG_N = cim_pb2.MSG_N
GROUP_A = cim_pb2.GROUP_A
ACCEPTED = cim_pb2.ACCEPTED
RATE_LIMITED = cim_pb2.Error.RATE_LIMITED
UNAVAILABLE = cim_pb2.Error.UNAVAILABLE

FANOUT_SLICE = 100
"""Group members served per reactor turn, so a big group does not stall other users."""

FANOUT_BATCH = 8
"""Queued messages of one group fanned out together: a connection gets them in one
write (one system call instead of one per message) once a backlog has formed."""

BACKLOG_RETRY = 1.0
"""Seconds a sender waits when the fan-out backlog is full."""

KNOWN_SIZES = 10_000
"""Groups whose member count is remembered for the backlog's estimate."""


@dataclass(slots=True)
class _Queued:
    """A group message waiting for its fan-out, and what it counts in the backlog."""

    message: cim_pb2.Message
    deliveries: int
    size: int


class GroupMessages:
    """GROUP_R, the membership rule for posts, and the fan-out of numbered posts."""

    log = Logger()

    def __init__(
        self,
        core: NodeCore,
        directory: Directory,
        peers: Peers,
        connected: Connected,
        routing: Routing,
        bounds: Bounds,
    ) -> None:
        self._node_id = core.node_id
        self._clock = core.clock
        self._metrics = core.metrics
        self._directory = directory
        self._peers = peers
        self._connected = connected
        self._routing = routing
        self._bounds = bounds
        # Group messages fan out one after another per group, in server-id order.
        self._fanout_queues: dict[str, deque[_Queued]] = {}
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.backlog_deliveries = 0
        """Deliveries waiting for fan-out here, all groups (estimated, see the module)."""
        self.backlog_bytes = 0
        """Bytes of the group messages waiting for fan-out here."""

    def frame_table(self) -> FrameTable:
        return {cim_pb2.GROUP_R: (cim_pb2.GroupRequest, self.group_requested)}

    def group_requested(self, session: ClientSession, request: cim_pb2.GroupRequest) -> None:
        d = self._directory.groups.answer(session.record.user, request)
        d.addCallback(lambda answer: session.deliver(GROUP_A, answer))
        d.addErrback(log_failure, self.log, "answer a group request")

    # --- posting ----------------------------------------------------------------------

    def backlog_refusal(self, group: str) -> Refusal | None:
        """Why a new post to ``group`` cannot be accepted now, or None."""
        bounds = self._bounds
        queue = self._fanout_queues.get(group)
        if queue is not None and len(queue) >= bounds.group_backlog:
            self._metrics.messages["group_refused_backlog"] += 1
            return Refusal(
                RATE_LIMITED,
                BACKLOG_RETRY,
                "this group has too many messages waiting to be delivered",
            )
        if (
            self.backlog_deliveries >= bounds.fanout_backlog
            or self.backlog_bytes >= bounds.fanout_backlog_bytes
        ):
            self._metrics.messages["group_refused_backlog"] += 1
            return Refusal(
                UNAVAILABLE, BACKLOG_RETRY, "the node has too many group deliveries waiting"
            )
        return None

    def may_post(self, group: str, user: str) -> Deferred[bool]:
        """Only members post to a group."""
        return self._directory.groups.is_member(group, user)

    def accepted(self, session: ClientSession, message: cim_pb2.Message) -> None:
        """The group message is in the group's timeline: tell the sender, fan out."""
        self._metrics.messages["group"] += 1
        self._routing.tell_sender(
            session.record.user,
            session.record.device,
            cim_pb2.AckN(
                msg_id=message.id,
                client_seq=message.client_seq,
                status=ACCEPTED,
                to=message.group,
            ),
        )
        queued = _Queued(message, self._sizes.get(message.group, 1), message.ByteSize())
        self.backlog_deliveries += queued.deliveries
        self.backlog_bytes += queued.size
        queue = self._fanout_queues.get(message.group)
        if queue is not None:
            queue.append(queued)  # a fan-out of this group is running: keep the order
            return
        self._fanout_queues[message.group] = deque([queued])
        done = Deferred.fromCoroutine(self._fan_out(message.group))
        done.addErrback(log_failure, self.log, "fan out a group message")

    # --- fan-out ----------------------------------------------------------------------

    async def _fan_out(self, group: str) -> None:
        """The queued messages of a group to every member, in slices, in order; up to
        ``FANOUT_BATCH`` queued ones together (a backlog makes its own batches)."""
        queue = self._fanout_queues[group]
        try:
            while queue:
                batch = list(islice(queue, FANOUT_BATCH))
                try:
                    await self._fan_out_batch(batch)
                except Exception:
                    self.log.failure(
                        "fan-out of group messages {ids} failed",
                        ids=[queued.message.id for queued in batch],
                    )
                    self._metrics.messages["group_fanout_failed"] += len(batch)
                for queued in batch:
                    queue.popleft()
                    self.backlog_deliveries -= queued.deliveries
                    self.backlog_bytes -= queued.size
        finally:
            del self._fanout_queues[group]
            for queued in queue:  # only if the loop itself broke
                self.backlog_deliveries -= queued.deliveries
                self.backlog_bytes -= queued.size

    def _learned_size(self, queued: _Queued, members: int) -> None:
        """The group's real member count: the backlog counts it from now on."""
        group = queued.message.group
        self.backlog_deliveries += members - queued.deliveries
        queued.deliveries = members
        self._sizes[group] = members
        self._sizes.move_to_end(group)
        while len(self._sizes) > KNOWN_SIZES:
            self._sizes.popitem(last=False)

    async def _fan_out_batch(self, batch: list[_Queued]) -> None:
        """Members here get the batch's messages in one write per connection, in order,
        when one member list holds for all of them (nobody joined or left in between);
        else one message after another. Then the copies for other nodes, in order."""
        lists: list[list[str]] = []
        for queued in batch:
            message = queued.message
            sender = getattr(message, "from")
            names = await self._directory.groups.member_names(message.group)
            self._learned_size(queued, max(1, sum(1 for m in names if m != sender)))
            lists.append(names)
        messages = [queued.message for queued in batch]
        if all(names == lists[0] for names in lists[1:]):
            await self._deliver_here(messages, lists[0])
        else:
            for message, names in zip(messages, lists, strict=True):
                await self._deliver_here([message], names)
        for message, names in zip(messages, lists, strict=True):
            await self._forward_elsewhere(message, names)

    async def _deliver_here(self, messages: list[cim_pb2.Message], names: list[str]) -> None:
        """Every device here of every member, the sender's other devices too (they show
        what it posted from this one); not the device that posted it (it has msg:A)."""
        connected = self._connected
        here = [m for m in names if m in connected]
        # Serialized once for every member; each connection only seals them.
        frames = [
            (message.device, getattr(message, "from"), encode_frame(MSG_N, message))
            for message in messages
        ]
        counts = self._metrics.messages
        for start in range(0, len(here), FANOUT_SLICE):
            if start:
                await deferLater(self._clock, 0, lambda: None)  # let other users in
            delivered = behind = 0
            for session in connected.devices_of_all(here[start : start + FANOUT_SLICE]):
                record = session.record
                out = [
                    frame
                    for device, sender, frame in frames
                    if device != record.device or sender != record.user
                ]
                if not out:
                    continue
                if session.may_take_live_copy():
                    session.deliver_encoded(out)
                    delivered += len(out)
                else:
                    # Behind on reading: told to pull once its queue drains.
                    behind += len(out)
            counts["group_delivered"] += delivered
            if behind:
                counts["group_behind"] += behind

    async def _forward_elsewhere(self, message: cim_pb2.Message, names: list[str]) -> None:
        """One bus message per node holding members; the members online nowhere read it
        from their cursors at their next login."""
        connected = self._connected
        sender = getattr(message, "from")
        elsewhere = [m for m in names if m not in connected and m != sender]
        if not elsewhere:
            return
        try:
            routes = await self._peers.nodes_of(elsewhere)
        except StateUnavailable:
            routes = {}
        by_node: dict[str, list[str]] = {}
        for member in elsewhere:
            node = routes.get(member)
            if node is not None and node != self._node_id and self._peers.is_alive(node):
                by_node.setdefault(node, []).append(member)
        for node, users in by_node.items():
            try:
                await self._routing.forward(node, message, users, "")
            except BusUnavailable as exc:
                self._missed(message, len(users), f"node {node} unreachable: {exc}")

    def _missed(self, message: cim_pb2.Message, count: int, why: str) -> None:
        self._metrics.messages["group_missed"] += count
        self.log.info(
            "group message {id} in {group} missed by {count} members: {why}",
            id=message.id,
            group=message.group,
            count=count,
            why=why,
        )
