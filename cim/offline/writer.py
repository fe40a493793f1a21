"""The consumer of the offline queue: from the broker into ``offline_msgs``, in batches.

The writer ignores the per-user cap (a confirmed message is not refused later), and a
database that fails is retried for as long as it takes, holding the messages rather
than handing them back to the broker's redelivery limit. It acknowledges a message
to the broker only after the transaction that stores it has committed: a crash in
between redelivers it, and the unique (receiver, msg_id) makes the second write
harmless. The batching and the retries are ``cim.backends.batching.BatchWriter``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.backends.batching import BatchWriter
from cim.backends.bus.broker import BrokerLink
from cim.backends.link import describe
from cim.offline.queue import DEFAULT_QUEUE, decode, queue_declaration
from cim.offline.store import OfflineItem
from cim.protocols import cim_pb2

__all__ = ["RETRY", "ItemStore", "OfflineWriter", "OnStored"]

RETRY = Backoff(0.5, 10.0)
"""Seconds between attempts to write a batch while the database fails."""

_log = Logger(namespace="cim.offline_pipeline")

OnStored = Callable[[list[str]], Any]
"""Told the receivers of each committed batch, e.g. ``Switchboard.stored_for``."""

_Pair = tuple[str, cim_pb2.Message]


class ItemStore(Protocol):
    """Where the writer puts a batch: ``OfflineStore.store`` without a cap."""

    def store(self, messages: Iterable[OfflineItem]) -> Deferred[int]: ...


class OfflineWriter:
    """Consumes the offline queue and stores it in batches, acknowledging after commit.

    A batch is written when ``batch_size`` messages are waiting or when the oldest has
    waited ``batch_wait`` seconds, one batch at a time: that is the pace the database
    sees, however fast messages are published. The prefetch window is twice the batch,
    so the next batch fills while one commits. Several writers (on several nodes) may
    consume the same queue.
    """

    def __init__(
        self,
        link: BrokerLink,
        store: ItemStore,
        reactor: IReactorTime,
        *,
        queue: str = DEFAULT_QUEUE,
        max_queued: int = 1_000_000,
        batch_size: int = 200,
        batch_wait: float = 0.2,
        on_stored: OnStored | None = None,
    ) -> None:
        self._link = link
        self._store = store
        self._queue = queue
        self._max_queued = max_queued
        self.on_stored = on_stored
        self._batches: BatchWriter[_Pair] = BatchWriter(
            reactor,
            self._write,
            name="offline writer",
            log=_log,
            batch_size=batch_size,
            batch_wait=batch_wait,
            retry=RETRY,
            on_written=self._written,
            on_abandoned=self._abandoned,
        )
        self._running = False
        self._consuming = False
        self.batches_written = 0

    @property
    def batch_size(self) -> int:
        return self._batches.batch_size

    @property
    def pending(self) -> int:
        """Messages taken from the queue and not yet committed."""
        return self._batches.pending

    def start(self) -> None:
        """Consume from now on (on every connection of the link)."""
        self._running = True
        if not self._consuming:
            self._consuming = True
            self._link.declare(queue_declaration(self._queue, self._max_queued)).addErrback(
                lambda _: None  # the link logs it and declares again on reconnecting
            )
            self._link.consume(self._queue, self._received, prefetch=2 * self.batch_size)

    def stop(self) -> Deferred[None]:
        """Finish the batch being written (its commit and acks), write nothing more.

        What is waiting stays unacknowledged: closing the link's connection hands it
        back to the broker for another writer or the next start.
        """
        self._running = False
        return self._batches.stop()

    def _received(self, body: bytes) -> Deferred[None]:
        try:
            pair = decode(body)
        except ValueError as exc:
            # Never storable: the link's poison rule drops it after repeated failures,
            # with an error naming the queue.
            return fail(exc)
        if not self._running:
            return Deferred()  # never acknowledged: the broker gets it back on close
        return self._batches.add(pair)  # the link acknowledges it when this fires

    def _write(self, batch: list[_Pair]) -> Deferred[int]:
        return self._store.store(batch)

    def _written(self, batch: list[_Pair], _: object) -> None:
        self.batches_written += 1
        if self.on_stored is not None:
            receivers = sorted({receiver for receiver, _ in batch})
            maybeDeferred(self.on_stored, receivers).addErrback(
                _log_failure, "offline writer: telling receivers to pull failed"
            )

    def _abandoned(self, batch: list[_Pair], failure: Failure) -> None:
        # Unacknowledged: redelivered to whoever consumes next.
        _log.warn(
            "offline writer: stopping with {count} messages unwritten ({why})",
            count=len(batch),
            why=describe(failure),
        )


def _log_failure(failure: Failure, what: str) -> None:
    _log.failure(what, failure)
