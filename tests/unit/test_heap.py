"""Handing freed heap memory back (cim.heap)."""

from __future__ import annotations

import gc
import sys
import weakref

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.heap import HeapTrimmer, find_malloc_trim, freeze_startup_heap


class HeapTrimmerTests(SynchronousTestCase):
    def test_trims_every_interval_until_stopped(self) -> None:
        clock = Clock()
        calls: list[float] = []
        trimmer = HeapTrimmer(clock, 5.0, lambda: calls.append(clock.seconds()) or 1)
        trimmer.start()
        clock.pump([1.0] * 16)
        self.assertEqual(calls, [5.0, 10.0, 15.0])
        trimmer.stop()
        clock.advance(20)
        self.assertEqual(len(calls), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_zero_interval_schedules_nothing(self) -> None:
        clock = Clock()
        trimmer = HeapTrimmer(clock, 0.0, lambda: 0)
        trimmer.start()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_failing_trim_stops_trying(self) -> None:
        clock = Clock()

        def broken() -> int:
            raise OSError("no")

        trimmer = HeapTrimmer(clock, 1.0, broken)
        trimmer.start()
        clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_glibc_has_malloc_trim(self) -> None:
        if not sys.platform.startswith("linux"):
            raise self.skipTest("glibc only")
        trim = find_malloc_trim()
        assert trim is not None
        self.assertIn(trim(), (0, 1))


class _Node:
    def __init__(self) -> None:
        self.me = self


class FreezeStartupHeapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)

    def test_what_lives_now_leaves_later_collections(self) -> None:
        kept = _Node()
        freeze_startup_heap()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertNotIn(kept, gc.get_objects())  # frozen objects are in no generation

    def test_garbage_is_collected_first_not_frozen(self) -> None:
        garbage = _Node()
        gone = weakref.ref(garbage)
        del garbage
        freeze_startup_heap()
        self.assertIsNone(gone())
