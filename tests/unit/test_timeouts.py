"""Connection deadlines on one shared timer (cim.protocols.timeouts)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.protocols.timeouts import DeadlineSweeper, SweptTimeoutMixin


class Conn(SweptTimeoutMixin):
    def __init__(self, sweeper: DeadlineSweeper) -> None:
        self.deadlines = sweeper
        self.closed_at: float | None = None

    def timeoutConnection(self) -> None:
        self.closed_at = self.deadlines.clock.seconds()


class DeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sweeper = DeadlineSweeper(self.clock, 0.5)

    def test_times_out_no_later_than_the_resolution(self) -> None:
        conn = Conn(self.sweeper)
        conn.setTimeout(3.2)
        self.clock.pump([0.1] * 32)
        self.assertIsNone(conn.closed_at)
        self.clock.pump([0.1] * 5)
        self.assertIsNotNone(conn.closed_at)
        assert conn.closed_at is not None
        self.assertTrue(3.2 <= conn.closed_at <= 3.7, conn.closed_at)
        self.assertEqual(len(self.sweeper), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_activity_moves_the_deadline(self) -> None:
        conn = Conn(self.sweeper)
        conn.setTimeout(2)
        for _ in range(10):
            self.clock.advance(1.5)
            conn.resetTimeout()
        self.assertIsNone(conn.closed_at)
        self.clock.advance(2.5)
        self.assertEqual(conn.closed_at, 17.5)

    def test_cancel_forgets_and_stops_the_timer(self) -> None:
        first, second = Conn(self.sweeper), Conn(self.sweeper)
        self.assertIsNone(first.setTimeout(1))
        second.setTimeout(1)
        self.assertEqual(first.setTimeout(None), 1)
        self.assertEqual(len(self.sweeper), 1)
        second.setTimeout(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.assertEqual((first.closed_at, second.closed_at), (None, None))

    def test_reset_without_a_timeout_does_nothing(self) -> None:
        conn = Conn(self.sweeper)
        conn.resetTimeout()
        self.clock.advance(10)
        self.assertIsNone(conn.closed_at)
        self.assertEqual(len(self.sweeper), 0)

    def test_changing_the_period_keeps_one_entry(self) -> None:
        conn = Conn(self.sweeper)
        conn.setTimeout(10)
        self.assertEqual(conn.setTimeout(1), 10)
        self.assertEqual(len(self.sweeper), 1)
        self.clock.pump([0.5] * 3)
        self.assertEqual(conn.closed_at, 1.0)

    def test_many_connections_expire_in_one_sweep(self) -> None:
        conns = [Conn(self.sweeper) for _ in range(100)]
        for conn in conns:
            conn.setTimeout(1)
        self.clock.pump([0.5, 0.5])
        self.assertEqual({conn.closed_at for conn in conns}, {1.0})
        self.assertEqual(len(self.sweeper), 0)


class ReleasingConn(Conn):
    """A connection with something to free when quiet (its cipher contexts)."""

    def __init__(self, sweeper: DeadlineSweeper) -> None:
        super().__init__(sweeper)
        self.released_at: list[float] = []

    def release_idle(self) -> None:
        self.released_at.append(self.deadlines.clock.seconds())


class ReleaseTests(SynchronousTestCase):
    """The same sweep frees what quiet connections can rebuild (issue #20)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sweeper = DeadlineSweeper(self.clock, 0.5)

    def test_a_used_connection_is_released_at_the_next_sweep(self) -> None:
        conn = ReleasingConn(self.sweeper)
        self.clock.advance(0.25)
        self.sweeper.used(conn)
        self.clock.advance(0.25)
        self.assertEqual(conn.released_at, [])
        self.clock.advance(0.25)
        self.assertEqual(conn.released_at, [0.75])
        # Nothing watched and nothing used: the timer stops.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.assertEqual(conn.released_at, [0.75])

    def test_a_busy_connection_is_released_once_per_sweep_not_per_frame(self) -> None:
        conn = ReleasingConn(self.sweeper)
        conn.setTimeout(30)
        for _ in range(16):
            self.sweeper.used(conn)
            conn.resetTimeout()
            self.clock.advance(0.125)
        self.assertEqual(conn.released_at, [0.5, 1.0, 1.5, 2.0])
        self.assertIsNone(conn.closed_at)

    def test_deadlines_and_releases_share_one_timer(self) -> None:
        conns = [ReleasingConn(self.sweeper) for _ in range(50)]
        for conn in conns:
            conn.setTimeout(10)
            self.sweeper.used(conn)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.5)
        self.assertEqual({len(conn.released_at) for conn in conns}, {1})
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_a_connection_that_stops_its_timeout_is_still_released(self) -> None:
        conn = ReleasingConn(self.sweeper)
        conn.setTimeout(10)
        self.sweeper.used(conn)
        conn.setTimeout(None)  # reading held: the deadline waits, the release does not
        self.clock.advance(0.5)
        self.assertEqual(conn.released_at, [0.5])
        self.assertEqual(self.clock.getDelayedCalls(), [])
