"""cim.backends.threads: the one thread-pool runner (the database, files, KDF and the
ZooKeeper registry run their blocking calls on it)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, cast

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cim.backends.threads import PoolNotRunning, ThreadPoolRunner, lower_this_thread
from tests.unit.test_storage import QueuedRunner, ThreadHopReactor, run_now


class ThreadPoolRunnerTests(SynchronousTestCase):
    def test_work_runs_on_the_named_pool_which_stops_at_shutdown(self) -> None:
        reactor = ThreadHopReactor()
        pool = ThreadPoolRunner("cim-test", 2, cast(Any, reactor))
        pool.start()
        [(phase, event, _)] = reactor.triggers.values()
        self.assertEqual((phase, event), ("during", "shutdown"))
        named = pool.run(lambda: threading.current_thread().name)
        reactor.wait_for(named)
        self.assertTrue(self.successResultOf(named).startswith("PoolThread-cim-test-"))
        stopped = pool.stop()
        reactor.wait_for(stopped)
        self.assertEqual(reactor.triggers, {})

    def test_an_owner_that_stops_it_at_shutdown_itself_gets_no_trigger(self) -> None:
        reactor = ThreadHopReactor()
        pool = ThreadPoolRunner("cim-test", 1, cast(Any, reactor), stop_at_shutdown=False)
        pool.start()
        self.assertEqual(reactor.triggers, {})
        stopped = pool.stop()
        reactor.wait_for(stopped)

    def test_work_before_start_or_after_stop_fails(self) -> None:
        pool = ThreadPoolRunner("cim-test", 1, cast(Any, ThreadHopReactor()))
        failure = self.failureResultOf(pool.run(lambda: 1), PoolNotRunning)
        self.assertIn("cim-test is not started", str(failure.value))
        self.successResultOf(pool.stop())
        failure = self.failureResultOf(pool.run(lambda: 1), PoolNotRunning)
        self.assertIn("cim-test is stopping", str(failure.value))

    def test_stop_waits_for_the_work_handed_over(self) -> None:
        runner = QueuedRunner()
        pool = ThreadPoolRunner("cim-test", 1, None, runner)
        pool.start()
        done = pool.run(lambda: 7)
        stopped = pool.stop()
        self.assertNoResult(stopped)
        runner.run_all()
        self.assertEqual(self.successResultOf(done), 7)
        self.successResultOf(stopped)
        self.successResultOf(pool.stop())

    def test_a_pool_without_reactor_needs_a_runner(self) -> None:
        with self.assertRaises(ValueError):
            ThreadPoolRunner("cim-test", 1, None).start()
        pool = ThreadPoolRunner("cim-test", 1, None, run_now)
        pool.start()
        self.assertEqual(self.successResultOf(pool.run(lambda: "now")), "now")

    def test_the_wait_for_a_thread_is_reported(self) -> None:
        waits: list[float] = []
        pool = ThreadPoolRunner("cim-test", 1, None, run_now, on_wait=waits.append)
        pool.start()
        self.successResultOf(pool.run(lambda: None))
        self.assertEqual(len(waits), 1)
        self.assertGreaterEqual(waits[0], 0.0)


class BelowTheReactorTests(SynchronousTestCase):
    """A pool with ``nice`` lowers each of its threads once, before their first work."""

    def test_each_thread_of_a_nice_pool_lowers_itself_once(self) -> None:
        reactor = ThreadHopReactor()
        lowered: list[tuple[str, int]] = []
        pool = ThreadPoolRunner(
            "cim-test",
            1,
            cast(Any, reactor),
            nice=7,
            lower=lambda by: lowered.append((threading.current_thread().name, by)),
        )
        pool.start()
        for _ in range(3):
            done = pool.run(lambda: None)
            reactor.wait_for(done)
        self.assertEqual(len(lowered), 1)
        name, by = lowered[0]
        self.assertTrue(name.startswith("PoolThread-cim-test-"))
        self.assertEqual(by, 7)
        reactor.wait_for(pool.stop())

    def test_an_injected_runner_is_never_lowered(self) -> None:
        # It runs the work in the caller's thread (tests): that is not the pool's.
        lowered: list[int] = []
        pool = ThreadPoolRunner("cim-test", 1, None, run_now, nice=7, lower=lowered.append)
        pool.start()
        self.successResultOf(pool.run(lambda: None))
        self.assertEqual(lowered, [])

    def test_lowering_a_thread_leaves_the_others(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("a thread's own nice is Linux's")
        here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen: list[tuple[bool, int]] = []

        def in_a_thread() -> None:
            changed = lower_this_thread(5)
            seen.append((changed, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(30)
        self.assertEqual(seen, [(True, min(19, here + 5))])
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), here)
        self.assertFalse(lower_this_thread(0))
