"""RabbitMqBus without a broker: the connection loop and the confirm bookkeeping.

They run on a fake reactor and a fake channel; the tests against a real broker are in
tests/integration/test_bus_rabbitmq.py.
"""

from __future__ import annotations

from typing import Any, cast

import pika
import pika.exceptions
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IConnector
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.bus.amqp import AmqpSession
from cim.backends.bus.amqp_link import AmqpLink
from cim.backends.bus.rabbitmq import RabbitMqBus
from cim.interfaces import BusUnavailable, IMessageBus
from tests.unit.test_bus_memory import LogCapture

# --- no broker: the connection loop and the confirm bookkeeping ----------------------


class FakeChannel:
    """Stands in for pika's TwistedChannel in confirm mode."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes, Any, bool, Deferred[Any]]] = []
        self.is_open = True

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool
    ) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.published.append((exchange, routing_key, body, properties, mandatory, d))
        return d


class Returned:
    def __init__(self, properties: Any) -> None:
        self.properties = properties
        self.method = pika.spec.Basic.Return(
            reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="ghost"
        )


def pretend_connected(link: AmqpLink, channel: FakeChannel) -> None:
    """Make ``channel`` the link's publishing channel, as if a connection were up."""
    session = AmqpSession(protocol=cast(Any, object()), publisher=channel)
    cast(Any, link.connection)._usable = (object(), session)


class ConfirmBookkeepingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.link = AmqpLink(
            self.reactor, "amqp://cim:s3cret@127.0.0.1:5699/%2F", confirm_timeout=2.0
        )
        self.channel = FakeChannel()
        pretend_connected(self.link, self.channel)

    def pika_outcome(self, index: int) -> Deferred[Any]:
        return self.channel.published[index][5]

    def test_messages_are_persistent_and_mandatory(self) -> None:
        self.link.publish("x", "n2", b"body")
        [(exchange, key, body, properties, mandatory, _)] = self.channel.published
        self.assertEqual((exchange, key, body, mandatory), ("x", "n2", b"body", True))
        self.assertEqual(properties.delivery_mode, 2)
        self.assertTrue(properties.message_id)

    def test_a_return_fails_its_own_message_whatever_pika_says(self) -> None:
        first = self.link.publish("x", "n2", b"routable")
        second = self.link.publish("x", "ghost", b"unroutable")
        self.link._returned(Returned(self.channel.published[1][3]))
        # One multiple ack settles both; pika pins the return on the first one.
        self.pika_outcome(0).errback(pika.exceptions.UnroutableError([]))
        self.pika_outcome(1).callback(None)
        self.successResultOf(first)
        failure = self.failureResultOf(second, BusUnavailable)
        self.assertIn("'ghost'", str(failure.value))
        self.assertIn("312 NO_ROUTE", str(failure.value))

    def test_a_nack_is_unavailable(self) -> None:
        d = self.link.publish("x", "n2", b"body")
        self.pika_outcome(0).errback(pika.exceptions.NackError([]))
        failure = self.failureResultOf(d, BusUnavailable)
        self.assertIn("nack", str(failure.value))

    def test_no_confirm_in_time_is_unavailable_and_a_late_one_is_ignored(self) -> None:
        d = self.link.publish("x", "n2", b"body")
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(d, BusUnavailable)
        self.assertIn("did not confirm within 2 s", str(failure.value))
        self.pika_outcome(0).callback(None)  # late: nothing happens
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_lost_connection_fails_what_waits_for_a_confirm(self) -> None:
        d = self.link.publish("x", "n2", b"body")
        self.pika_outcome(0).errback(pika.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"))
        failure = self.failureResultOf(d, BusUnavailable)
        self.assertIn("before the confirm", str(failure.value))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_what_waits_for_confirms_is_bounded(self) -> None:
        link = AmqpLink(
            self.reactor,
            "amqp://cim:s3cret@127.0.0.1:5699/%2F",
            confirm_timeout=2.0,
            max_unconfirmed=2,
        )
        channel = FakeChannel()
        pretend_connected(link, channel)
        waiting = [link.publish("x", "n2", b"%d" % i) for i in range(2)]
        failure = self.failureResultOf(link.publish("x", "n2", b"more"), BusUnavailable)
        self.assertIn("waiting for RabbitMQ's confirm", str(failure.value))
        self.assertEqual(len(channel.published), 2)
        channel.published[0][5].callback(None)
        self.successResultOf(waiting[0])
        waiting.append(link.publish("x", "n2", b"room again"))
        self.assertEqual(len(channel.published), 3)
        # Timed-out messages still count until the broker settles them.
        self.reactor.advance(2.0)
        for d in waiting[1:]:
            self.failureResultOf(d, BusUnavailable)
        self.failureResultOf(link.publish("x", "n2", b"still waiting"), BusUnavailable)


class RabbitMqConnectionLoopTests(SynchronousTestCase):
    """The reconnect loop and fail-fast publishes, on a fake reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.log = LogCapture(self, "cim.bus.rabbitmq")
        self.bus = RabbitMqBus(
            self.reactor,
            "amqp://cim:s3cret@127.0.0.1:5699/%2F",
            "n1",
            "cim.nodes",
            2.0,
            start_timeout=5.0,
            reconnect_delay=0.2,
            max_reconnect_delay=5.0,
        )

    def refuse_pending(self) -> int:
        refused = 0
        connector = cast(IConnector, None)  # the endpoint's factory never looks at it
        while self.reactor.tcpClients:
            _, _, factory, _, _ = self.reactor.tcpClients.pop()
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            refused += 1
        return refused

    def test_provides_interface(self) -> None:
        self.assertTrue(IMessageBus.providedBy(self.bus))

    def test_publish_fails_at_once_before_start(self) -> None:
        failure = self.failureResultOf(self.bus.publish("n2", b"x"), BusUnavailable)
        self.assertIn("not connected", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_start_fails_after_the_timeout(self) -> None:
        started = self.bus.start()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertNoResult(started)
        self.reactor.advance(4.9)
        self.assertNoResult(started)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(started, BusUnavailable)
        self.assertIn("127.0.0.1:5699", str(failure.value))
        self.assertNotIn("s3cret", str(failure.value))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reconnects_forever_with_capped_jittered_backoff_and_logs_once(self) -> None:
        self.bus.link.connection.start()  # without start()'s deadline
        delays: list[float] = []
        for _ in range(40):
            self.assertEqual(self.refuse_pending(), 1)
            [retry] = [
                call
                for call in self.reactor.getDelayedCalls()
                if call.getTime() - self.reactor.seconds() <= 5.0
            ]
            delays.append(retry.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        self.assertEqual(len(self.reactor.tcpClients), 1)  # still trying after 40
        self.assertLessEqual(max(delays), 5.0)
        self.assertGreater(max(delays), 3.0)
        self.assertLess(delays[0], 0.25)
        self.assertGreater(len(set(delays[-10:])), 1)  # jittered
        self.assertEqual(len(self.log.lines("warn")), 1)
        self.assertNotIn("s3cret", repr(self.log.events))
        self.successResultOf(self.bus.stop())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_publish_fails_at_once_while_reconnecting(self) -> None:
        started = self.bus.start()
        self.refuse_pending()
        failure = self.failureResultOf(self.bus.publish("n2", b"x"), BusUnavailable)
        self.assertIn("unreachable", str(failure.value))
        self.assertIn("refused", str(failure.value))
        self.reactor.advance(5)
        self.failureResultOf(started, BusUnavailable)
