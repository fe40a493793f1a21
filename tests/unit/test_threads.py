"""cim.backends.threads: the one thread-pool runner (the database, files, KDF and the
ZooKeeper registry run their blocking calls on it)."""

from __future__ import annotations

import threading
from typing import Any, cast

from twisted.trial.unittest import SynchronousTestCase

from cim.backends.threads import PoolNotRunning, ThreadPoolRunner
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
