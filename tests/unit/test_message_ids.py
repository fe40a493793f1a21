"""Server message ids: time-ordered, unique across nodes, never backwards on a node."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.message_ids import EPOCH_MS, MAX_NODE_NUMBER, SEQUENCE_BITS, MessageIdGenerator


def clock_at(ms: int) -> Clock:
    clock = Clock()
    clock.advance(ms / 1000)
    return clock


class MessageIdTests(SynchronousTestCase):
    def test_ids_follow_time_and_carry_it(self) -> None:
        clock = clock_at(EPOCH_MS + 5_000)
        ids = MessageIdGenerator(clock, 7)
        first = ids.next_id()
        clock.advance(0.002)
        second = ids.next_id()
        self.assertLess(first, second)
        self.assertEqual(MessageIdGenerator.timestamp_ms(first), EPOCH_MS + 5_000)
        self.assertEqual(MessageIdGenerator.timestamp_ms(second), EPOCH_MS + 5_002)
        self.assertLess(second, 1 << 63)

    def test_many_in_one_millisecond_stay_unique_and_increasing(self) -> None:
        ids = MessageIdGenerator(clock_at(EPOCH_MS + 1), 3)
        taken = [ids.next_id() for _ in range(10_000)]  # more than 4,096 per millisecond
        self.assertEqual(taken, sorted(taken))
        self.assertEqual(len(set(taken)), len(taken))

    def test_clock_stepping_back_never_repeats_or_goes_back(self) -> None:
        clock = clock_at(EPOCH_MS + 100_000)
        ids = MessageIdGenerator(clock, 1)
        before = [ids.next_id() for _ in range(3)]
        clock.rightNow -= 60  # NTP steps the wall clock back a minute
        after = [ids.next_id() for _ in range(3)]
        self.assertEqual(before + after, sorted(before + after))
        self.assertEqual(len(set(before + after)), 6)

    def test_two_nodes_never_collide(self) -> None:
        clock = clock_at(EPOCH_MS + 42)
        a, b = MessageIdGenerator(clock, 1), MessageIdGenerator(clock, 2)
        from_a = {a.next_id() for _ in range(5_000)}
        from_b = {b.next_id() for _ in range(5_000)}
        self.assertEqual(len(from_a), 5_000)
        self.assertEqual(from_a & from_b, set())

    def test_node_number_must_fit(self) -> None:
        with self.assertRaises(ValueError):
            MessageIdGenerator(Clock(), 1024)

    def test_the_claimed_number_goes_into_later_ids(self) -> None:
        """The daemon makes the generator first and claims its number during start-up."""
        clock = clock_at(EPOCH_MS + 42)
        ids = MessageIdGenerator(clock, 0)
        ids.claim(9)
        self.assertEqual((ids.next_id() >> SEQUENCE_BITS) & MAX_NODE_NUMBER, 9)
        with self.assertRaises(ValueError):
            ids.claim(MAX_NODE_NUMBER + 1)
