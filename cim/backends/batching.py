"""One batch writer with retry: how cim turns a stream of messages into transactions.

The offline writer (``cim.offline.writer``) and the archive (``cim.history.archive``)
both take messages one at a time, from the broker or from the node itself, and must
get them into the database without one transaction per message and without losing
any while the database is down. They share this writer:

- items wait until ``batch_size`` of them are waiting, or until the oldest has waited
  ``batch_wait`` seconds (counted also while a batch commits), and are written one
  batch at a time: that is the pace the database sees, however fast items come;
- a write that fails is retried with the one backoff policy for as long as it takes,
  holding its items (a broker delivery stays unacknowledged, rather than being handed
  to the broker's redelivery limit); one warning when writing starts failing, one
  line when it works again;
- a failure that the same rows will always hit again (``permanent``) splits the batch
  to find the culprit, which is handed to ``on_rejected`` and counts as done;
- the Deferred ``add`` returns fires once the item's batch has committed: that is when
  a broker delivery may be acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.backends.link import describe

__all__ = ["BatchWriter"]

T = TypeVar("T")


def _ignore(*_: object) -> None:
    """The null hook: nothing to count or say."""


_Entry = tuple[T, "Deferred[None] | None"]
"""An item and what fires after its commit (None for an item ``put`` without one): a
plain tuple, so ``put_many`` makes a journal turn's entries without a Python call
per item."""


class BatchWriter(Generic[T]):
    """Collects items, writes them in batches, retries failed writes; see the module.

    ``write`` stores one batch in one transaction (its result goes to ``on_written``).
    The hooks are told, for counters and logs: ``on_written(batch, result)`` after a
    commit, ``on_failure(batch, failure)`` after each failed attempt,
    ``on_rejected(item, failure)`` for an item that can never be written, and
    ``on_abandoned(batch, failure)`` for what ``stop`` gave up on.
    """

    def __init__(
        self,
        clock: IReactorTime,
        write: Callable[[list[T]], Deferred[Any]],
        *,
        name: str,
        log: Logger,
        batch_size: int,
        batch_wait: float,
        retry: Backoff,
        permanent: tuple[type[BaseException], ...] = (),
        on_written: Callable[[list[T], Any], object] = _ignore,
        on_failure: Callable[[list[T], Failure], object] = _ignore,
        on_rejected: Callable[[T, Failure], object] = _ignore,
        on_abandoned: Callable[[list[T], Failure], object] = _ignore,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if batch_wait < 0:
            raise ValueError("batch_wait must not be negative")
        self._clock = clock
        self._write = write
        self._name = name
        self._log = log
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.retry = retry
        self._permanent = permanent
        self._on_written = on_written
        self._on_failure = on_failure
        self._on_rejected = on_rejected
        self._on_abandoned = on_abandoned
        self._waiting: list[_Entry[T]] = []
        self._in_flight = 0
        self._timer: IDelayedCall | None = None
        self._overdue = False
        self._singles = 0
        """Items still to be written one at a time, after a permanent batch failure."""
        self._writing = False
        self._idle_waiters: list[Deferred[None]] = []
        self._nap: tuple[IDelayedCall, Deferred[None]] | None = None
        self._failures = 0
        self._stopping = False
        self._flushing = False

    @property
    def pending(self) -> int:
        """Items taken and not yet committed (waiting, being written or retried)."""
        return len(self._waiting) + self._in_flight

    def add(self, item: T) -> Deferred[None]:
        """Write item soon; fires after the commit of its batch.

        After ``stop`` nothing is taken: the Deferred never fires (a broker delivery
        stays unacknowledged and comes back when the connection closes).
        """
        done: Deferred[None] = Deferred()
        if self._stopping:
            return done
        self._waiting.append((item, done))
        self._schedule()
        return done

    def put(self, item: T) -> None:
        """Write item soon, like ``add``, when nobody waits for its commit.

        No Deferred per item: a busy node keeps thousands of items waiting, and each
        object they hold is one more for every garbage collection to walk. Whatever
        happens to the item is still told to the hooks.
        """
        if not self._stopping:
            self._waiting.append((item, None))
            self._schedule()

    def put_many(self, items: Iterable[T]) -> None:
        """``put`` for several items at once (a journal turn's copies): one schedule."""
        if not self._stopping:
            waiting = self._waiting
            before = len(waiting)
            waiting.extend(zip(items, repeat(None)))
            if len(waiting) > before:
                self._schedule()

    def flush(self) -> None:
        """Write what waits now, without waiting out ``batch_wait``: someone needs it
        in the database (a read that must see it). Batches still follow each other."""
        if self._waiting and not self._stopping:
            _cancel(self._timer)
            self._timer = None
            self._overdue = True
            self._schedule()

    def stop(self, *, flush: bool = False) -> Deferred[None]:
        """Stop writing; fires when the last write is over.

        Without ``flush``: the write in progress finishes (without further retries)
        and what waits is left as it is, its Deferreds unfired, for the broker to
        deliver again. With ``flush``: everything waiting is written, one attempt per
        batch, and what fails even so is abandoned and its Deferreds failed.
        """
        self._stopping = True
        self._flushing = flush
        _cancel(self._timer)
        self._timer = None
        if self._nap is not None:
            self._wake()
        return Deferred.fromCoroutine(self._finish())

    async def _finish(self) -> None:
        while self._writing or (self._flushing and self._waiting):
            if self._writing:
                idle: Deferred[None] = Deferred()
                self._idle_waiters.append(idle)
                await idle
            else:
                self._write_next()

    # --- batches ----------------------------------------------------------------------

    def _schedule(self) -> None:
        """The wait counts from the oldest waiting item, also while a batch commits."""
        if self._stopping or not self._waiting:
            return  # stop() writes what it writes
        if not self._writing and (
            self._overdue or self._singles or len(self._waiting) >= self.batch_size
        ):
            self._write_next()
        elif self._timer is None and not self._overdue:
            self._timer = self._clock.callLater(self.batch_wait, self._due)

    def _due(self) -> None:
        self._timer = None
        self._overdue = True
        self._schedule()

    def _write_next(self) -> None:
        _cancel(self._timer)
        self._timer = None
        self._overdue = False
        size = 1 if self._singles else self.batch_size
        batch = self._waiting[:size]
        del self._waiting[:size]
        if self._waiting and not self._stopping:
            # The rest has waited a while already; close enough.
            self._timer = self._clock.callLater(self.batch_wait, self._due)
        self._in_flight = len(batch)
        # Set before the write starts: a store that answers at once, or a hook that
        # adds items, must not start a second write meanwhile.
        self._writing = True
        writing = Deferred.fromCoroutine(self._commit(batch))
        writing.addErrback(self._unexpected)
        writing.addBoth(self._written)

    def _unexpected(self, failure: Failure) -> None:
        self._log.failure("{name}: unexpected failure", failure, name=self._name)

    def _written(self, _: object) -> None:
        self._writing = False
        self._in_flight = 0
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._schedule()

    async def _commit(self, batch: list[_Entry[T]]) -> None:
        items = [entry[0] for entry in batch]
        while True:
            try:
                result = await self._write(items)
                break
            except Exception:
                failure = Failure()
            self._on_failure(items, failure)
            if failure.check(*self._permanent):
                self._set_aside(batch, failure)
                return
            if self._stopping:
                self._abandon(batch, failure)
                return
            self._failures += 1
            if self._failures == 1:
                self._log.warn(
                    "{name}: writing {count} messages failed ({why}); retrying, at most "
                    "every {cap:g} s",
                    name=self._name,
                    count=len(batch),
                    why=describe(failure),
                    cap=self.retry.maximum,
                )
            await self._sleep(self.retry.after(self._failures))
            if self._stopping and not self._flushing:
                self._abandon(batch, failure)
                return
        if self._singles:
            self._singles -= 1
        if self._failures:
            self._failures = 0
            self._log.info("{name}: writing works again", name=self._name)
        for _, done in batch:
            if done is not None:
                done.callback(None)
        self._on_written(items, result)

    def _set_aside(self, batch: list[_Entry[T]], failure: Failure) -> None:
        """A permanent failure: find the culprit one item at a time."""
        if len(batch) > 1:
            self._singles = len(batch)
            self._waiting[:0] = batch
            return
        self._singles = max(0, self._singles - 1)
        item, done = batch[0]
        self._on_rejected(item, failure)
        if done is not None:
            done.callback(None)  # done with it: writing it again fails again

    def _abandon(self, batch: list[_Entry[T]], failure: Failure) -> None:
        """Stopping, and the write failed: with a flush, what waits goes with it."""
        entries = batch
        if self._flushing:
            entries, self._waiting = batch + self._waiting, []
        self._on_abandoned([entry[0] for entry in entries], failure)
        if self._flushing:
            for _, done in entries:
                if done is not None:
                    done.errback(failure)

    def _sleep(self, seconds: float) -> Deferred[None]:
        """A pause ``stop`` can cut short."""
        woken: Deferred[None] = Deferred()
        self._nap = (self._clock.callLater(seconds, self._wake), woken)
        return woken

    def _wake(self) -> None:
        if self._nap is None:
            return
        call, woken = self._nap
        self._nap = None
        _cancel(call)
        woken.callback(None)


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()
