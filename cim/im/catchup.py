"""Catching up on what was stored while a user was away (design: 方案2, 优化方案1).

A client pulls its offline messages page by page (OFFLINE_R, each pull acknowledging
the page before), acknowledges the last page (OFFLINE_ACK_R) and may ask how many
wait from whom (OFFLINE_SUMMARY_R). A page is bounded in count and in bytes: below
the node's frame limit and the client's own (``OfflineR.max_bytes``), so a box of
large messages cannot make a page the client must refuse; one message larger than
that comes alone. When something reaches the store for a user who
is connected, here or on another node, that user is told to pull (OFFLINE_NOTICE),
so a message stored while its receiver was logging in is not left waiting.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

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

__all__ = ["MAX_OFFLINE_PAGE", "Catchup"]

OFFLINE_A = cim_pb2.OFFLINE_A
OFFLINE_ACK_A = cim_pb2.OFFLINE_ACK_A
OFFLINE_SUMMARY_A = cim_pb2.OFFLINE_SUMMARY_A
OFFLINE_NOTICE = cim_pb2.OFFLINE_NOTICE
MAX_OFFLINE_PAGE = 1000


class Catchup:
    """OFFLINE_R, OFFLINE_ACK_R, OFFLINE_SUMMARY_R, and the notice to pull."""

    log = Logger()

    def __init__(self, core: NodeCore, stores: Stores, peers: Peers, connected: Connected) -> None:
        self._node_id = core.node_id
        self._stores = stores
        self._peers = peers
        self._connected = connected

    def frame_table(self) -> FrameTable:
        return {
            cim_pb2.OFFLINE_R: (cim_pb2.OfflineR, self.offline_requested),
            cim_pb2.OFFLINE_ACK_R: (cim_pb2.OfflineAckR, self.offline_acknowledged),
            cim_pb2.OFFLINE_SUMMARY_R: (cim_pb2.OfflineSummaryR, self.summary_requested),
        }

    # --- the client's questions -------------------------------------------------------

    def offline_requested(self, session: ClientSession, request: cim_pb2.OfflineR) -> None:
        """A page of the user's stored messages; asking acknowledges the previous page."""
        offline = self._stores.offline
        user = session.record.user
        limit = min(request.limit or self._stores.offline_page_size, MAX_OFFLINE_PAGE)
        budget = page_budget(self._stores.max_page_bytes, request.max_bytes)

        async def answer() -> None:
            acknowledged = 0
            if request.ack_ids:
                acknowledged = await offline.acknowledge(user, list(request.ack_ids))
            page = await offline.page(user, request.before or None, limit, budget)
            session.deliver(
                OFFLINE_A,
                cim_pb2.OfflineA(
                    messages=[cim_pb2.Message.FromString(r.payload) for r in page.records],
                    more=page.more,
                    next_before=page.next_before or 0,
                    acknowledged=acknowledged,
                ),
            )

        Deferred.fromCoroutine(answer()).addErrback(log_failure, self.log, "answer an offline pull")

    def offline_acknowledged(self, session: ClientSession, request: cim_pb2.OfflineAckR) -> None:
        d = self._stores.offline.acknowledge(session.record.user, list(request.ack_ids))
        d.addCallback(
            lambda count: session.deliver(OFFLINE_ACK_A, cim_pb2.OfflineAckA(acknowledged=count))
        )
        d.addErrback(log_failure, self.log, "acknowledge offline messages")

    def summary_requested(self, session: ClientSession, request: cim_pb2.OfflineSummaryR) -> None:
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

        d = self._stores.offline.summary(session.record.user)
        d.addCallback(answer)
        d.addErrback(log_failure, self.log, "summarise offline messages")

    # --- telling receivers to pull ----------------------------------------------------

    def notify_stored(self, receivers: list[str]) -> None:
        """A receiver that logged in while its message was being stored pulls again."""
        for receiver in receivers:
            session = self._connected.get(receiver)
            if session is not None:
                session.deliver(OFFLINE_NOTICE, cim_pb2.OfflineNotice())

    def stored_for(self, receivers: list[str]) -> Deferred[None]:
        """Messages reached the store for these users (the offline writer committed):
        those connected anywhere are told to pull (design: no gap)."""
        connected = self._connected
        here = [user for user in receivers if user in connected]
        self.notify_stored(here)
        elsewhere = [user for user in receivers if user not in connected]
        if not elsewhere:
            return succeed(None)
        peers = self._peers

        async def tell() -> None:
            routes = await peers.nodes_of(elsewhere)
            by_node: dict[str, list[str]] = {}
            for user, node in routes.items():
                if node != self._node_id and peers.is_alive(node):
                    by_node.setdefault(node, []).append(user)
            for node, users in by_node.items():
                envelope = cim_pb2.BusEnvelope(
                    origin_node=self._node_id, stored=cim_pb2.OfflineReady(receivers=users)
                )
                await peers.publish(node, envelope)

        d = Deferred.fromCoroutine(tell())
        # Not telling is not losing: the receiver's next pull finds the messages.
        d.addErrback(lambda failure: failure.trap(BusUnavailable, StateUnavailable))
        d.addErrback(log_failure, self.log, "tell receivers to pull")
        return d
