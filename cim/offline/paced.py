"""The offline box as the node's backpressure sees it: messages waiting to be stored.

Live copies a receiver behind on reading does not take, and every message for a
receiver who is offline, go to the offline store; its writes queue for the database
threads that logins, consent checks and catch-up need too. ``PacedOfflineBox``:

- counts the messages handed to the store and not yet stored (or failed) in the
  node's ``NodeQueue`` (cim.protocols.outbound), which stops reading from the
  heaviest senders while too many wait ([im] max_pending_work): a flood then waits
  in the flooders' sockets, not in the database's queue;
- writes the stores asked for within ``BATCH_WAIT`` in one transaction (a receiver
  cut for reading too slowly leaves up to its whole budget of messages to store at
  once, one store each; a flood for a receiver who is offline asks one store per
  message, each taking the receiver's row lock for its cap). A batch the
  store refuses as over a receiver's cap is written caller by caller instead, so
  each caller gets the answer it would have got alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from cim.im.collaborators import OfflineBox
from cim.offline.store import OfflineItem, OfflinePage, SenderCount
from cim.protocols.outbound import NodeQueue
from cim.storage.offline import OfflineFull

__all__ = ["BATCH_WAIT", "PacedOfflineBox"]

BATCH_WAIT = 0.02
"""Seconds a store waits for others to share its transaction: the sender's "stored"
comes this much later, and the database sees one commit instead of dozens."""

T = TypeVar("T")


@dataclass(slots=True)
class _Waiting:
    items: list[OfflineItem]
    capped: bool
    done: Deferred[int] = field(default_factory=Deferred)


class PacedOfflineBox:
    """An ``OfflineBox`` whose stores in flight count in the node's queue, and whose
    stores within ``BATCH_WAIT`` share a transaction."""

    def __init__(self, box: OfflineBox, queue: NodeQueue, clock: IReactorTime) -> None:
        self.box = box
        self._queue = queue
        self._clock = clock
        self._waiting: list[_Waiting] = []
        self._flush: IDelayedCall | None = None

    def store(self, messages: Iterable[OfflineItem], *, capped: bool = True) -> Deferred[int]:
        """Fires with how many of the caller's messages are new; when the caller shared
        a transaction with others, with how many it handed over."""
        waiting = _Waiting(list(messages), capped)
        count = len(waiting.items)
        queue = self._queue
        queue.store_started(count)

        def finished(result: T) -> T:
            queue.store_finished(count)
            return result

        self._waiting.append(waiting)
        if self._flush is None:
            self._flush = self._clock.callLater(BATCH_WAIT, self._write)
        return waiting.done.addBoth(finished)

    def _write(self) -> None:
        self._flush = None
        batch, self._waiting = self._waiting, []
        for capped in (True, False):
            group = [waiting for waiting in batch if waiting.capped is capped]
            if len(group) == 1:
                self._alone(group[0])
            elif group:
                self._together(group, capped)

    def _alone(self, waiting: _Waiting) -> None:
        self.box.store(waiting.items, capped=waiting.capped).chainDeferred(waiting.done)

    def _together(self, group: list[_Waiting], capped: bool) -> None:
        items = [item for waiting in group for item in waiting.items]

        def stored(_: int) -> None:
            for waiting in group:
                waiting.done.callback(len(waiting.items))

        def refused(failure: Failure) -> None:
            if failure.check(OfflineFull):
                for waiting in group:
                    self._alone(waiting)
                return
            for waiting in group:
                waiting.done.errback(failure)

        self.box.store(items, capped=capped).addCallbacks(stored, refused)

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
