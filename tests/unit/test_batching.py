"""cim.backends.batching: the one batch writer, on a task.Clock with a fake store."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.backoff import Backoff
from cim.backends.batching import BatchWriter


class Refused(Exception):
    """A row the database will always refuse."""


class FakeStore:
    """Writes batches at once, or holds them, or fails them, as the test says."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.held: list[Deferred[int]] | None = None
        self.down = 0
        self.refuse: set[int] = set()

    def write(self, batch: list[int]) -> Deferred[int]:
        self.batches.append(list(batch))
        if self.refuse & set(batch):
            return fail(Refused("constraint"))
        if self.down:
            self.down -= 1
            return fail(RuntimeError("database down"))
        if self.held is not None:
            d: Deferred[int] = Deferred()
            self.held.append(d)
            return d
        return succeed(len(batch))


class BatchWriterTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeStore()
        self.events: list[dict[str, Any]] = []
        self.written: list[tuple[list[int], Any]] = []
        self.failures: list[list[int]] = []
        self.rejected: list[int] = []
        self.abandoned: list[list[int]] = []
        self.writer = self.make()

    def make(self, **options: Any) -> BatchWriter[int]:
        options.setdefault("batch_size", 3)
        options.setdefault("batch_wait", 1.0)
        return BatchWriter(
            self.clock,
            self.store.write,
            name="test writer",
            log=Logger(observer=cast(ILogObserver, self.events.append)),
            retry=Backoff(0.5, 4.0),
            permanent=(Refused,),
            on_written=lambda batch, result: self.written.append((batch, result)),
            on_failure=lambda batch, failure: self.failures.append(batch),
            on_rejected=lambda item, failure: self.rejected.append(item),
            on_abandoned=lambda batch, failure: self.abandoned.append(batch),
            **options,
        )

    def lines(self, level: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_level"].name == level]


class BatchingTests(BatchWriterTestCase):
    def test_a_full_batch_is_written_at_once_and_acknowledged_after_commit(self) -> None:
        self.store.held = []
        done = [self.writer.add(i) for i in (1, 2, 3)]
        self.assertEqual(self.store.batches, [[1, 2, 3]])
        for d in done:
            self.assertNoResult(d)
        self.assertEqual(self.writer.pending, 3)
        self.store.held[0].callback(3)
        for d in done:
            self.successResultOf(d)
        self.assertEqual(self.written, [([1, 2, 3], 3)])
        self.assertEqual(self.writer.pending, 0)

    def test_a_partial_batch_is_written_after_the_wait(self) -> None:
        done = self.writer.add(1)
        self.clock.advance(0.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual(self.store.batches, [[1]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_put_many_takes_any_iterable_in_order_with_one_schedule(self) -> None:
        self.writer.put_many(iter(range(1, 6)))
        self.assertEqual(self.store.batches, [[1, 2, 3]])
        self.writer.put_many(iter(()))  # nothing: no timer of its own
        self.writer.put_many(x for x in (6,))
        self.clock.advance(1.0)
        self.assertEqual(self.store.batches, [[1, 2, 3], [4, 5, 6]])
        self.assertEqual([batch for batch, _ in self.written], [[1, 2, 3], [4, 5, 6]])
        self.assertEqual(self.writer.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_burst_is_cut_into_batches(self) -> None:
        for i in range(1, 8):
            self.writer.add(i)
        self.assertEqual(self.store.batches, [[1, 2, 3], [4, 5, 6]])
        self.clock.advance(1.0)
        self.assertEqual(self.store.batches[-1], [7])

    def test_one_batch_at_a_time_and_the_wait_counts_while_one_commits(self) -> None:
        self.store.held = []
        for i in (1, 2, 3):
            self.writer.add(i)
        self.writer.add(4)
        self.clock.advance(1.0)  # 4 is overdue, but a batch is still committing
        self.assertEqual(self.store.batches, [[1, 2, 3]])
        self.store.held[0].callback(3)
        self.assertEqual(self.store.batches, [[1, 2, 3], [4]])

    def test_a_hook_that_adds_during_a_write_does_not_start_a_second_one(self) -> None:
        writer = self.make(batch_size=1)
        added: list[Deferred[None]] = []
        writer._on_written = lambda batch, result: (
            added.append(writer.add(batch[0] + 10)) if batch[0] < 10 else None
        )
        self.successResultOf(writer.add(1))
        self.assertEqual(self.store.batches, [[1], [11]])
        self.successResultOf(added[0])

    def test_put_items_are_batched_with_added_ones_and_told_to_the_hooks(self) -> None:
        self.store.held = []
        self.writer.put(1)
        done = self.writer.add(2)
        self.writer.put(3)
        self.assertEqual(self.store.batches, [[1, 2, 3]])
        self.assertEqual(self.writer.pending, 3)
        self.store.held[0].callback(3)
        self.successResultOf(done)
        self.assertEqual(self.written, [([1, 2, 3], 3)])
        self.assertEqual(self.writer.pending, 0)

    def test_a_put_item_refused_for_good_is_set_aside_like_an_added_one(self) -> None:
        self.store.refuse = {2}
        for i in (1, 2, 3):
            self.writer.put(i)
        self.assertEqual(self.rejected, [2])
        self.assertEqual([batch for batch, _ in self.written], [[1], [3]])

    def test_put_items_abandoned_by_a_failed_final_flush_are_told(self) -> None:
        self.writer.put(1)
        self.store.down = 5
        d = self.writer.stop(flush=True)
        self.successResultOf(d)
        self.assertEqual(self.abandoned, [[1]])

    def test_nothing_is_put_after_stop(self) -> None:
        self.successResultOf(self.writer.stop())
        self.writer.put(1)
        self.assertEqual(self.writer.pending, 0)
        self.clock.advance(10)
        self.assertEqual(self.store.batches, [])

    def test_nonsense_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            self.make(batch_size=0)
        with self.assertRaises(ValueError):
            self.make(batch_wait=-1.0)


class RetryTests(BatchWriterTestCase):
    def test_a_failing_write_is_retried_with_backoff_holding_its_items(self) -> None:
        self.store.down = 3
        done = [self.writer.add(i) for i in (1, 2, 3)]
        for delay in (0.5, 1.0, 2.0):
            for d in done:
                self.assertNoResult(d)  # never failed: a broker would drop it
            self.clock.advance(delay - 0.01)
            self.assertEqual(len(self.store.batches), len(self.failures))
            self.clock.advance(0.01)
        for d in done:
            self.successResultOf(d)
        self.assertEqual(self.store.batches, [[1, 2, 3]] * 4)
        self.assertEqual(len(self.failures), 3)
        [warning] = self.lines("warn")
        self.assertEqual(warning["why"], "database down")
        [back] = self.lines("info")
        self.assertIn("works again", back["log_format"])

    def test_the_failure_count_starts_again_after_a_success(self) -> None:
        self.store.down = 2
        for i in (1, 2, 3):
            self.writer.add(i)
        self.clock.advance(0.5)  # the first retry fails too; the next waits 1 s
        self.clock.advance(1.0)
        self.assertEqual(len(self.written), 1)
        self.store.down = 1
        for i in (4, 5, 6):
            self.writer.add(i)
        self.clock.advance(0.49)
        self.assertEqual(len(self.written), 1)
        self.clock.advance(0.01)  # back to the first step
        self.assertEqual(len(self.written), 2)

    def test_a_permanent_failure_finds_the_culprit_one_at_a_time(self) -> None:
        self.store.refuse = {2}
        done = [self.writer.add(i) for i in (1, 2, 3)]
        self.assertEqual(self.store.batches, [[1, 2, 3], [1], [2], [3]])
        self.assertEqual(self.rejected, [2])
        for d in done:
            self.successResultOf(d)  # the culprit too: writing it again fails again
        self.assertEqual([batch for batch, _ in self.written], [[1], [3]])
        self.assertEqual(self.lines("warn"), [])
        self.writer.add(4)
        self.writer.add(5)
        self.assertEqual(self.store.batches[-1], [3])  # batches again, not singles


class StopTests(BatchWriterTestCase):
    def test_stop_finishes_the_write_in_progress_and_leaves_the_rest(self) -> None:
        self.store.held = []
        done = [self.writer.add(i) for i in range(1, 5)]
        stopped = self.writer.stop()
        self.assertNoResult(stopped)
        self.store.held[0].callback(3)
        self.successResultOf(stopped)
        for d in done[:3]:
            self.successResultOf(d)
        self.assertNoResult(done[3])  # for the broker to deliver again
        self.assertEqual(self.store.batches, [[1, 2, 3]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cuts_a_retry_short_and_abandons_the_batch(self) -> None:
        self.store.down = 1
        done = [self.writer.add(i) for i in range(1, 5)]
        self.successResultOf(self.writer.stop())
        for d in done:
            self.assertNoResult(d)
        self.assertEqual(self.abandoned, [[1, 2, 3]])
        self.assertEqual(self.store.batches, [[1, 2, 3]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_with_flush_writes_everything_waiting(self) -> None:
        writer = self.make(batch_size=100, batch_wait=60.0)
        done = [writer.add(i) for i in (1, 2)]
        self.successResultOf(writer.stop(flush=True))
        self.assertEqual(self.store.batches, [[1, 2]])
        for d in done:
            self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_with_flush_tries_once_more_and_fails_what_it_cannot_write(self) -> None:
        writer = self.make(batch_size=2)
        self.store.down = 2
        done = [writer.add(i) for i in (1, 2, 3)]
        self.successResultOf(writer.stop(flush=True))
        self.assertEqual(self.store.batches, [[1, 2], [1, 2]])
        for d in done:
            self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.abandoned, [[1, 2, 3]])

    def test_stop_with_flush_still_sets_a_refused_item_aside(self) -> None:
        writer = self.make(batch_size=100, batch_wait=60.0)
        self.store.refuse = {2}
        done = [writer.add(i) for i in (1, 2, 3)]
        self.successResultOf(writer.stop(flush=True))
        self.assertEqual(self.rejected, [2])
        for d in done:
            self.successResultOf(d)

    def test_nothing_is_taken_after_stop(self) -> None:
        self.successResultOf(self.writer.stop())
        self.assertNoResult(self.writer.add(1))
        self.assertEqual(self.writer.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_unexpected_error_in_a_hook_is_logged_not_raised(self) -> None:
        def broken(batch: list[int], result: Any) -> None:
            raise KeyError("bug")

        self.writer._on_written = broken
        for i in (1, 2, 3):
            self.writer.add(i)
        [critical] = self.lines("critical")
        self.assertIsInstance(critical["log_failure"], Failure)
        self.flushLoggedErrors(KeyError)
        self.writer.add(4)  # still working
        self.clock.advance(1.0)
        self.assertEqual(self.store.batches[-1], [4])
