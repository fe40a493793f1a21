"""FailedLoginThrottle: sliding windows on a fake clock, bounded memory."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.throttle import FailedLoginThrottle


class ThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = FailedLoginThrottle(self.clock, max_failures=3, window=60)

    def test_allows_until_limit(self) -> None:
        for _ in range(2):
            self.throttle.record_failure("alice")
            self.assertEqual(self.throttle.blocked("alice"), 0)
        self.throttle.record_failure("alice")
        self.assertEqual(self.throttle.blocked("alice"), 60)
        self.assertEqual(self.throttle.blocked("bob"), 0)

    def test_window_slides(self) -> None:
        self.throttle.record_failure("alice")  # t=0
        self.clock.advance(20)
        self.throttle.record_failure("alice")  # t=20
        self.clock.advance(20)
        self.throttle.record_failure("alice")  # t=40
        self.assertEqual(self.throttle.blocked("alice"), 20)
        self.clock.advance(20)  # t=60: the first failure left the window
        self.assertEqual(self.throttle.blocked("alice"), 0)
        self.throttle.record_failure("alice")  # t=60: three in the window again
        self.assertEqual(self.throttle.blocked("alice"), 20)

    def test_success_clears(self) -> None:
        for _ in range(3):
            self.throttle.record_failure("alice")
        self.throttle.record_success("alice")
        self.assertEqual(self.throttle.blocked("alice"), 0)
        self.assertEqual(len(self.throttle), 0)
        self.throttle.record_success("never-failed")

    def test_forgive_takes_back_one_failure(self) -> None:
        for _ in range(3):
            self.throttle.record_failure("alice")
        self.throttle.forgive("alice")
        self.assertEqual(self.throttle.blocked("alice"), 0)
        self.throttle.forgive("alice")
        self.throttle.forgive("alice")
        self.assertEqual(len(self.throttle), 0)
        self.throttle.forgive("alice")
        self.throttle.forgive("never-failed")
        self.assertEqual(len(self.throttle), 0)

    def test_counting_before_the_outcome_caps_concurrent_attempts(self) -> None:
        """Attempts counted when they start: a burst started together stops at the limit."""
        started = 0
        for _ in range(10):
            if self.throttle.blocked("alice"):
                continue
            self.throttle.record_failure("alice")
            started += 1
        self.assertEqual(started, 3)

    def test_old_keys_are_dropped(self) -> None:
        for i in range(1000):
            self.throttle.record_failure(f"user{i}")
        self.assertEqual(len(self.throttle), 1000)
        self.clock.advance(30)
        self.throttle.record_failure("late")
        self.assertEqual(len(self.throttle), 1001)
        self.clock.advance(30)
        self.assertEqual(self.throttle.blocked("anyone"), 0)
        self.assertEqual(len(self.throttle), 1)
        self.clock.advance(30)
        self.throttle.blocked("anyone")
        self.assertEqual(len(self.throttle), 0)

    def test_key_refreshed_by_new_failure_survives(self) -> None:
        self.throttle.record_failure("alice")
        self.throttle.record_failure("bob")
        self.clock.advance(50)
        self.throttle.record_failure("alice")
        self.clock.advance(20)
        self.throttle.blocked("x")
        self.assertEqual(len(self.throttle), 1)

    def test_max_keys_caps_memory(self) -> None:
        throttle = FailedLoginThrottle(self.clock, max_failures=2, window=60, max_keys=10)
        for i in range(100):
            throttle.record_failure(f"addr{i}")
        self.assertEqual(len(throttle), 10)
        throttle.record_failure("addr99")
        self.assertEqual(throttle.blocked("addr99"), 60)

    def test_rejects_nonsense_limits(self) -> None:
        self.assertRaises(ValueError, FailedLoginThrottle, self.clock, 0, 60)
        self.assertRaises(ValueError, FailedLoginThrottle, self.clock, 3, 0)
