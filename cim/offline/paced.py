"""The offline box as the node's backpressure sees it: messages waiting to be stored.

Live copies a receiver behind on reading does not take, and every message for a
receiver who is offline, go to the offline store; its writes queue for the database
threads that logins, consent checks and catch-up need too. ``PacedOfflineBox`` counts
the messages handed to the store and not yet stored (or failed) in the node's
``NodeQueue`` (cim.protocols.outbound), which stops reading from the heaviest
senders while too many wait ([im] max_pending_work): a flood then waits in the
flooders' sockets, not in the database's queue.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from twisted.internet.defer import Deferred

from cim.im.collaborators import OfflineBox
from cim.offline.store import OfflineItem, OfflinePage, SenderCount
from cim.protocols.outbound import NodeQueue

__all__ = ["PacedOfflineBox"]

T = TypeVar("T")


class PacedOfflineBox:
    """An ``OfflineBox`` whose stores in flight count in the node's queue."""

    def __init__(self, box: OfflineBox, queue: NodeQueue) -> None:
        self.box = box
        self._queue = queue

    def store(self, messages: Iterable[OfflineItem], *, capped: bool = True) -> Deferred[int]:
        items = list(messages)
        count = len(items)
        queue = self._queue
        queue.store_started(count)

        def finished(result: T) -> T:
            queue.store_finished(count)
            return result

        return self.box.store(items, capped=capped).addBoth(finished)

    def page(
        self,
        receiver: str,
        before: int | None = None,
        limit: int = 100,
        max_bytes: int | None = None,
    ) -> Deferred[OfflinePage]:
        return self.box.page(receiver, before, limit, max_bytes)

    def acknowledge(self, receiver: str, msg_ids: Iterable[int]) -> Deferred[int]:
        return self.box.acknowledge(receiver, msg_ids)

    def summary(self, receiver: str) -> Deferred[list[SenderCount]]:
        return self.box.summary(receiver)
