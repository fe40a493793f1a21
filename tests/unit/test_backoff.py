"""cim.backends.backoff: the one backoff policy, and the formulas it replaced."""

from __future__ import annotations

import random

from twisted.application.internet import backoffPolicy
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.backoff import Backoff


class BackoffTests(SynchronousTestCase):
    def test_the_step_doubles_from_initial_up_to_the_cap(self) -> None:
        backoff = Backoff(0.5, 5.0)
        self.assertEqual([backoff.step(n) for n in range(6)], [0.5, 1.0, 2.0, 4.0, 5.0, 5.0])
        self.assertEqual(backoff.step(-3), 0.5)

    def test_the_step_is_twisteds_backoff_policy_without_its_jitter(self) -> None:
        backoff = Backoff(0.3, 17.0, factor=1.5)
        twisted = backoffPolicy(0.3, 17.0, 1.5, jitter=lambda: 0.0)
        for attempt in range(40):
            self.assertEqual(backoff.step(attempt), twisted(attempt))

    def test_a_huge_attempt_count_stays_at_the_cap(self) -> None:
        self.assertEqual(Backoff(0.25, 5.0).delay(10**9), 5.0)

    def test_without_jitter_the_delay_is_the_step(self) -> None:
        backoff = Backoff(0.25, 5.0)
        self.assertEqual([backoff.delay(n) for n in range(6)], [0.25, 0.5, 1.0, 2.0, 4.0, 5.0])

    def test_after_counts_failures_from_one(self) -> None:
        backoff = Backoff(0.25, 5.0)
        self.assertEqual([backoff.after(n) for n in (1, 2, 3)], [0.25, 0.5, 1.0])

    def test_jitter_takes_a_random_share_from_inside_the_step(self) -> None:
        backoff = Backoff(0.5, 5.0, jitter=0.2)
        rng = random.Random(3)
        delays = [backoff.delay(10, rng) for _ in range(200)]
        self.assertTrue(all(4.0 <= delay <= 5.0 for delay in delays))
        self.assertGreater(len(set(delays)), 100)
        self.assertLess(min(delays), 4.1)
        self.assertGreater(max(delays), 4.9)

    def test_equal_jitter_is_the_clients_old_formula_draw_for_draw(self) -> None:
        backoff = Backoff(1.0, 8.0, jitter=0.5)
        ours, old = random.Random(7), random.Random(7)
        for attempt in range(12):
            step = min(8.0, 1.0 * (2 ** min(attempt, 16)))
            self.assertEqual(backoff.delay(attempt, ours), step / 2 + old.uniform(0, step / 2))

    def test_the_links_old_formula_is_kept(self) -> None:
        backoff = Backoff(0.2, 5.0, jitter=0.2)
        for failures in range(1, 40):
            step = min(5.0, 0.2 * 2 ** min(failures - 1, 30))
            delay = backoff.after(failures)
            self.assertGreaterEqual(delay, step * 0.8 - 1e-12)
            self.assertLessEqual(delay, step)

    def test_as_a_client_service_policy_the_first_wait_is_initial(self) -> None:
        policy = Backoff(0.5, 30.0).policy()
        self.assertEqual([policy(n) for n in (1, 2, 3)], [0.5, 1.0, 2.0])

    def test_nonsense_is_refused(self) -> None:
        for initial, maximum, jitter, factor in (
            (0.0, 1.0, 0.0, 2.0),
            (2.0, 1.0, 0.0, 2.0),
            (1.0, 2.0, 1.5, 2.0),
            (1.0, 2.0, 0.0, 0.5),
        ):
            with self.assertRaises(ValueError):
                Backoff(initial, maximum, jitter, factor)

    def test_the_clients_backoff_is_this_one_with_its_old_defaults(self) -> None:
        from cim.client.session import Backoff as ClientBackoff

        client = ClientBackoff()
        self.assertIsInstance(client, Backoff)
        ours, old = random.Random(11), random.Random(11)
        for attempt in range(20):
            step = min(30.0, 0.5 * (2 ** min(attempt, 16)))
            self.assertEqual(client.delay(attempt, ours), step / 2 + old.uniform(0, step / 2))
