"""Journaled records copied into SQLite (``cim.history.journal``).

A record is promised once the journal file holds it; this copies the records into the
timeline tables in large batches through the one batch writer (``copy_txn``:
replay-safe, renumbers nothing), says which journal files may go once all their records
are there, and answers whoever waits for the database to be current (``settled``).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.backends.batching import BatchWriter
from cim.history.journal_file import JournalFiles
from cim.history.unavailable import TimelineUnavailable
from cim.storage.database import Database
from cim.storage.timeline_journal import CopyRow, Readers, copy_txn

__all__ = ["RETRY", "JournalCopies"]

RETRY = Backoff(0.2, 10.0)

_log = Logger(namespace="cim.timeline")


class JournalCopies:
    """The copies of one journal's records, in the order they were journaled."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        files: JournalFiles,
        counts: Counter[str],
        *,
        batch_size: int,
        batch_wait: float,
    ) -> None:
        self.batch_size = batch_size
        self._files = files
        self.counts = counts
        self._writer: BatchWriter[CopyRow] = BatchWriter(
            clock,
            lambda batch: db.run(copy_txn, batch, self._starting_in(batch)),
            name="timeline journal",
            log=_log,
            batch_size=batch_size,
            batch_wait=batch_wait,
            retry=RETRY,
            permanent=(ValueError,),
            on_written=self._copied,
            on_failure=self._failed,
            on_rejected=self._rejected,
        )
        self.journaled = 0
        """Records journaled (promised) so far."""
        self.copied = 0
        """Every record up to this index is in the database."""
        self._runs: deque[list[int]] = deque()
        """[generation, count] of the records waiting for their copy, oldest first:
        the copies commit in the order they were journaled (``BatchWriter`` writes,
        retries and sets aside in order), so each commit's count says which files it
        emptied, and a copy waiting is one flat row, not a row in a wrapper."""
        self.starting: dict[str, Readers] = {}
        """The readers of a 1:1 conversation whose first message waits for its copy."""
        self._waiters: list[tuple[int, Deferred[None], bool]] = []
        """(index to reach, who waits, whether the copies were hurried for it)."""
        self.failing = False
        """The copies fail (retried); reads cannot settle meanwhile."""
        self._unput = False
        """Records are counted whose rows ``put`` has not brought yet."""
        self._hurried = False
        """A read asked for the copies while such rows were on their way."""

    @property
    def behind(self) -> int:
        """Records journaled and not yet in the database."""
        return self.journaled - self.copied

    def add(self, rows: Iterable[CopyRow], count: int, generation: int) -> None:
        """``count`` records, just written to journal file ``generation``."""
        self.count(count, generation)
        self.put(rows)

    def count(self, count: int, generation: int) -> None:
        """The first half of ``add``: ``count`` records written to journal file
        ``generation`` wait for their copy (``settled`` waits for them from now).
        Their rows follow with ``put``, before any later records are counted."""
        self.journaled += count
        self._unput = True
        runs = self._runs
        if runs and runs[-1][0] == generation:
            runs[-1][1] += count
        else:
            runs.append([generation, count])

    def put(self, rows: Iterable[CopyRow]) -> None:
        """The second half of ``add``: the rows of the records counted last. Counted
        first: a database that answers at once commits inside ``put_many``."""
        self._unput = False
        self._writer.put_many(rows)
        if self._hurried:
            # A read asked for the copies while these rows were on their way.
            self._hurried = False
            self._writer.flush()

    def settled(self, *, hurry: bool = True) -> Deferred[None]:
        """Fires once every record journaled so far is in the database; fails while
        the copies fail. ``hurry``: the waiting batch is written at once (a read someone
        waits for); without it the copies keep their pace (``COPY_WAIT``), for work
        nobody waits for (cursor moves), so it adds no transaction of its own."""
        if self.failing:
            return fail(TimelineUnavailable("the timeline's database writes fail"))
        mark = self.journaled
        if self.copied >= mark:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((mark, d, hurry))
        if hurry:
            self._writer.flush()
            if self._unput:  # flushed too when they come
                self._hurried = True
        return d

    async def stop(self) -> None:
        """Copy what waits; a read still waiting then is refused."""
        await self._writer.stop(flush=True)
        waiters, self._waiters = self._waiters, []
        for _, d, _ in waiters:  # a read that waited for what could not be copied
            d.errback(TimelineUnavailable("the node stopped before the write"))

    def _starting_in(self, batch: list[CopyRow]) -> dict[str, Readers]:
        """The readers ``copy_txn`` writes for the first messages in ``batch``."""
        starting = self.starting
        if not starting:
            return {}
        return {row[0]: starting[row[0]] for row in batch if row[1] == 1 and row[0] in starting}

    def _copied(self, batch: list[CopyRow], rows: object) -> None:
        self._done(batch)
        if self.failing:
            self.failing = False
            _log.info("timeline: journal copies work again")

    def _done(self, batch: list[CopyRow]) -> None:
        count = len(batch)
        self.copied += count
        self.counts["appended"] += count
        runs = self._runs
        while count:
            run = runs[0]
            taken = min(count, run[1])
            self._files.committed(run[0], taken)
            run[1] -= taken
            count -= taken
            if not run[1]:
                runs.popleft()
        if self.starting:
            for row in batch:
                if row[1] == 1:
                    self.starting.pop(row[0], None)
        copied_to = self.copied
        ready = [d for mark, d, _ in self._waiters if mark <= copied_to]
        self._waiters = [w for w in self._waiters if w[0] > copied_to]
        if any(hurry for _, _, hurry in self._waiters):
            self._writer.flush()
        for d in ready:
            d.callback(None)

    def _failed(self, batch: list[CopyRow], failure: Failure) -> None:
        self.counts["write_failed"] += 1
        if failure.check(ValueError):
            return
        self.failing = True
        waiters, self._waiters = self._waiters, []
        for _, d, _ in waiters:
            d.errback(TimelineUnavailable(failure.getErrorMessage()))

    def _rejected(self, item: CopyRow, failure: Failure) -> None:
        self.counts["rejected"] += 1
        _log.error(
            "timeline: journaled message {id} cannot be copied into the database: {why}",
            id=item[2],
            why=failure.getErrorMessage(),
        )
        self._done([item])
