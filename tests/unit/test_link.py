"""cim.backends.link: the one reconnecting link, on a fake clock and fake connections.

No sockets: ``FakeConnections`` plays TCP, the prepare step and the far end, and the
test decides when each of them answers.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.backoff import Backoff
from cim.backends.link import Link, LinkReport, LinkStopped, TcpConnections


class FakeProtocol:
    def __init__(self, name: str) -> None:
        self.name = name
        self.prepared: Deferred[str] = Deferred()
        self.ended: Deferred[str] = Deferred()
        self.closed = False
        self.aborted = False

    def lose(self, why: str) -> None:
        if not self.ended.called:
            self.ended.callback(why)


class FakeConnections:
    """Every connect is answered by the test through ``attempts``."""

    def __init__(self) -> None:
        self.attempts: list[Deferred[FakeProtocol]] = []
        self.cancelled = 0
        self.protocols: list[FakeProtocol] = []
        self.ups: list[str] = []
        self.downs: list[str] = []

    def connect(self) -> Deferred[FakeProtocol]:
        d: Deferred[FakeProtocol] = Deferred(self._cancelled)
        self.attempts.append(d)
        return d

    def _cancelled(self, attempt: Deferred[FakeProtocol]) -> None:
        self.cancelled += 1

    def prepare(self, protocol: FakeProtocol) -> Deferred[str]:
        return protocol.prepared

    def when_lost(self, protocol: FakeProtocol) -> Deferred[str]:
        return protocol.ended

    def close(self, protocol: FakeProtocol) -> None:
        protocol.closed = True

    def abort(self, protocol: FakeProtocol) -> None:
        protocol.aborted = True
        protocol.lose("aborted")

    def up(self, usable: str) -> None:
        self.ups.append(usable)

    def down(self, usable: str) -> None:
        self.downs.append(usable)

    # --- the test's side --------------------------------------------------------------

    def tcp(self) -> FakeProtocol:
        """Answer the newest attempt with a fresh connection."""
        protocol = FakeProtocol(f"c{len(self.protocols) + 1}")
        self.protocols.append(protocol)
        self.attempts[-1].callback(protocol)
        return protocol

    def refuse(self) -> None:
        self.attempts[-1].errback(ConnectionRefusedError("connection refused"))

    def usable(self) -> FakeProtocol:
        protocol = self.tcp()
        protocol.prepared.callback(protocol.name)
        return protocol


class LinkTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.connections = FakeConnections()
        self.events: list[dict[str, Any]] = []
        self.link: Link[FakeProtocol, str] = self.make_link()

    def make_link(self, **options: Any) -> Link[FakeProtocol, str]:
        report = LinkReport(
            Logger(namespace="test.link", observer=cast(ILogObserver, self.events.append)),
            "store",
            "connection to Example at db:1",
            "calls fail",
        )
        return Link(self.clock, self.connections, Backoff(0.5, 5.0, jitter=0.0), report, **options)

    def lines(self, level: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_level"].name == level]

    def text(self, event: dict[str, Any]) -> str:
        from twisted.logger import formatEvent

        return formatEvent(event)

    def retry_delay(self) -> float:
        [call] = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()


class ConnectingTests(LinkTestCase):
    def test_a_connection_is_usable_once_prepared(self) -> None:
        ready = self.link.when_ready()
        self.link.start()
        protocol = self.connections.tcp()
        self.assertIsNone(self.link.usable)
        self.assertNoResult(ready)
        protocol.prepared.callback("c1")
        self.assertEqual(self.successResultOf(ready), "c1")
        self.assertEqual(self.link.usable, "c1")
        self.assertTrue(self.link.connected)
        self.assertEqual(self.connections.ups, ["c1"])
        self.assertEqual(self.successResultOf(self.link.when_ready()), "c1")
        [up] = self.lines("info")
        self.assertEqual(self.text(up), "store: connection to Example at db:1 is up")
        self.assertIsNone(self.link.last_error)

    def test_start_twice_connects_once(self) -> None:
        self.link.start()
        self.link.start()
        self.assertEqual(len(self.connections.attempts), 1)

    def test_reconnects_forever_with_the_backoff_and_logs_once(self) -> None:
        self.link.start()
        delays = []
        for _ in range(30):
            self.connections.refuse()
            delays.append(self.retry_delay())
            self.clock.advance(delays[-1])
        self.assertEqual(delays[:6], [0.5, 1.0, 2.0, 4.0, 5.0, 5.0])
        self.assertEqual(max(delays), 5.0)
        self.assertEqual(len(self.connections.attempts), 31)
        [warning] = self.lines("warn")
        self.assertEqual(
            self.text(warning),
            "store: cannot open the connection to Example at db:1 (connection refused); retrying",
        )
        self.assertEqual(self.link.last_error, "connection refused")
        self.assertTrue(self.link.tried)

    def test_jitter_spreads_the_retries(self) -> None:
        link = Link(
            self.clock,
            self.connections,
            Backoff(0.5, 5.0, jitter=0.2),
            LinkReport(Logger(observer=cast(ILogObserver, self.events.append)), "s", "c", "w"),
        )
        link.start()
        delays = []
        for _ in range(20):
            self.connections.refuse()
            delays.append(self.retry_delay())
            self.clock.advance(delays[-1])
        self.assertTrue(all(4.0 <= d <= 5.0 for d in delays[-10:]))
        self.assertGreater(len(set(delays[-10:])), 1)

    def test_a_failed_prepare_aborts_the_connection_and_retries(self) -> None:
        self.link.start()
        protocol = self.connections.tcp()
        protocol.prepared.errback(RuntimeError("WRONGPASS invalid password"))
        self.assertTrue(protocol.aborted)
        self.assertEqual(self.link.last_error, "WRONGPASS invalid password")
        self.assertEqual(self.retry_delay(), 0.5)
        self.clock.advance(0.5)
        self.connections.usable()
        self.assertTrue(self.link.connected)
        self.assertEqual(len(self.lines("warn")), 1)

    def test_a_prepare_step_that_raises_fails_the_attempt(self) -> None:
        def broken(protocol: FakeProtocol) -> Deferred[str]:
            raise RuntimeError("no such command")

        self.connections.prepare = broken  # type: ignore[method-assign]
        self.link.start()
        protocol = self.connections.tcp()
        self.assertTrue(protocol.aborted)
        self.assertEqual(self.link.last_error, "no such command")
        self.assertEqual(self.retry_delay(), 0.5)

    def test_a_connection_lost_while_preparing_is_retried_and_its_late_result_ignored(
        self,
    ) -> None:
        self.link.start()
        protocol = self.connections.tcp()
        protocol.lose("closed by the server")
        self.assertEqual(self.link.last_error, "closed by the server")
        protocol.prepared.callback("c1")  # too late
        self.assertIsNone(self.link.usable)
        self.assertEqual(self.connections.ups, [])
        self.assertEqual(self.retry_delay(), 0.5)

    def test_a_connection_that_ended_at_once_is_not_prepared(self) -> None:
        self.link.start()
        protocol = FakeProtocol("gone")
        protocol.lose("closed at once")
        protocol.prepared = Deferred(lambda _: self.fail("prepared a dead connection"))
        self.connections.attempts[-1].callback(protocol)
        self.assertEqual(self.link.last_error, "closed at once")
        self.assertEqual(self.retry_delay(), 0.5)

    def test_the_attempt_deadline_covers_tcp(self) -> None:
        link = self.make_link(attempt_timeout=3.0)
        link.start()
        self.clock.advance(3.0)
        self.assertEqual(self.connections.cancelled, 1)
        self.assertEqual(link.last_error, "no usable connection within 3 s")
        self.assertEqual(self.retry_delay(), 0.5)

    def test_the_attempt_deadline_covers_the_prepare_step(self) -> None:
        link = self.make_link(attempt_timeout=3.0)
        link.start()
        self.clock.advance(1.0)
        protocol = self.connections.tcp()
        self.clock.advance(2.0)
        self.assertTrue(protocol.aborted)
        self.assertEqual(link.last_error, "no usable connection within 3 s")
        self.assertEqual(self.retry_delay(), 0.5)
        protocol.prepared.callback("c1")
        self.assertIsNone(link.usable)

    def test_a_usable_connection_stops_the_deadline(self) -> None:
        link = self.make_link(attempt_timeout=3.0)
        link.start()
        self.connections.usable()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertTrue(link.connected)


class LosingTests(LinkTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.link.start()
        self.first = self.connections.usable()

    def test_a_lost_connection_is_reported_once_and_retried_soon(self) -> None:
        self.first.lose("connection lost")
        self.assertIsNone(self.link.usable)
        self.assertEqual(self.connections.downs, ["c1"])
        self.assertEqual(self.retry_delay(), 0.5)
        for _ in range(5):
            self.clock.advance(self.retry_delay())
            self.connections.refuse()
        [lost] = self.lines("warn")
        self.assertEqual(
            self.text(lost),
            "store: lost the connection to Example at db:1 (connection lost); calls fail "
            "until it is back, retrying at most every 5 s",
        )
        self.clock.advance(self.retry_delay())
        self.connections.usable()
        self.assertEqual(self.link.usable, "c2")
        self.assertEqual([e["state"] for e in self.lines("info")], ["up", "back"])

    def test_failures_count_again_from_the_start_after_a_good_connection(self) -> None:
        self.first.lose("connection lost")
        self.clock.advance(0.5)
        self.connections.refuse()
        self.assertEqual(self.retry_delay(), 1.0)
        self.clock.advance(1.0)
        second = self.connections.usable()
        second.lose("connection lost")
        self.assertEqual(self.retry_delay(), 0.5)

    def test_drop_cuts_the_connection_and_reports_why(self) -> None:
        self.link.drop("no reply within 2 s")
        self.assertTrue(self.first.aborted)
        self.assertIsNone(self.link.usable)
        [lost] = self.lines("warn")
        self.assertEqual(lost["why"], "no reply within 2 s")
        self.assertEqual(self.link.last_error, "no reply within 2 s")

    def test_drop_without_a_connection_does_nothing(self) -> None:
        self.first.lose("connection lost")
        self.link.drop("late")
        self.assertEqual(self.link.last_error, "connection lost")


class StoppingTests(LinkTestCase):
    def test_stop_closes_cleanly_and_fires_once_the_connection_ended(self) -> None:
        self.link.start()
        protocol = self.connections.usable()
        stopped = self.link.stop()
        self.assertTrue(protocol.closed)
        self.assertFalse(protocol.aborted)
        self.assertEqual(self.connections.downs, ["c1"])
        self.assertIsNone(self.link.usable)
        self.assertNoResult(stopped)
        protocol.lose("closed")
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.lines("warn"), [])  # a stop is no outage

    def test_a_close_that_hangs_is_cut(self) -> None:
        link = self.make_link(close_timeout=2.0)
        link.start()
        protocol = self.connections.usable()
        stopped = link.stop()
        self.clock.advance(1.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.assertTrue(protocol.aborted)
        self.successResultOf(stopped)

    def test_stop_while_connecting_cancels_the_attempt_and_fails_the_waiters(self) -> None:
        ready = self.link.when_ready()
        self.link.start()
        stopped = self.link.stop()
        self.successResultOf(stopped)
        self.assertEqual(self.connections.cancelled, 1)
        self.failureResultOf(ready, LinkStopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.connections.attempts), 1)

    def test_stop_while_preparing_aborts(self) -> None:
        self.link.start()
        protocol = self.connections.tcp()
        self.successResultOf(self.link.stop())
        self.assertTrue(protocol.aborted)
        protocol.prepared.callback("c1")
        self.assertIsNone(self.link.usable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_while_waiting_to_retry_cancels_the_retry(self) -> None:
        self.link.start()
        self.connections.refuse()
        self.successResultOf(self.link.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(len(self.connections.attempts), 1)

    def test_a_connection_made_after_stop_is_dropped(self) -> None:
        self.link.start()
        attempt = self.connections.attempts[0]
        self.link._running = False  # as if stop() came between the connect and its answer
        self.link._attempt = None
        protocol = FakeProtocol("late")
        attempt.callback(protocol)
        self.assertTrue(protocol.aborted)

    def test_start_after_stop_connects_again(self) -> None:
        self.link.start()
        self.connections.usable().lose("closed")
        self.successResultOf(self.link.stop())
        self.link.start()
        self.assertEqual(len(self.connections.attempts), 2)
        self.connections.usable()
        self.assertEqual(self.link.usable, "c2")

    def test_a_waiter_that_gives_up_is_forgotten(self) -> None:
        ready = self.link.when_ready()
        ready.addTimeout(1.0, self.clock)
        self.link.start()
        self.clock.advance(1.0)
        self.failureResultOf(ready, TimeoutError)
        self.connections.usable()  # nothing left to call back


class TcpConnectionsTests(SynchronousTestCase):
    def test_close_and_abort_go_through_the_transport(self) -> None:
        class Transport:
            def __init__(self) -> None:
                self.calls: list[str] = []

            def loseConnection(self) -> None:
                self.calls.append("lose")

            def abortConnection(self) -> None:
                self.calls.append("abort")

        class Proto:
            transport = Transport()

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                return succeed(Proto())

        connections: TcpConnections[Any, Any] = TcpConnections(Endpoint(), object())  # type: ignore[arg-type]
        protocol = self.successResultOf(connections.connect())
        connections.close(protocol)
        connections.abort(protocol)
        connections.abort(object())  # no transport yet: nothing to do
        self.assertEqual(Proto.transport.calls, ["lose", "abort"])
