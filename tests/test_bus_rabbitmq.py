"""RabbitMqBus: the bus contract against real RabbitMQ, confirms, returns and outages.

Integration tests use the real reactor. The contract and the confirm tests run on the
machine's broker (CIM_TEST_AMQP_URL, default 127.0.0.1:5672), each under an exchange
and node ids of its own that are deleted afterwards; the outage tests run a private
node (tests/rabbitmq.py) they can stop, pause and start. Without RabbitMQ they skip,
or fail when CIM_REQUIRE_SERVICES=1.

The unit tests at the end need no broker: they drive the connection loop and the
confirm bookkeeping with a fake reactor and a fake channel.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, cast

import pika
import pika.exceptions
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IConnector
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cim.backends.bus import node_queue
from cim.backends.bus.amqp import AmqpSession, parse_amqp_url
from cim.backends.bus.amqp_link import AmqpLink
from cim.backends.bus.rabbitmq import RabbitMqBus
from cim.interfaces import BusUnavailable, IMessageBus
from tests.rabbitmq import SHARED_URL, amqp_answers, shared_rabbitmq
from tests.services import eventually, free_port, service_missing
from tests.test_bus_memory import BusContract, LogCapture

CONFIRM_TIMEOUT = 2.0


class RabbitFixture(TestCase):
    """Buses on one broker, under an exchange and node ids this test deletes after."""

    timeout = 60
    url = SHARED_URL

    def setUp(self) -> None:
        self.check_broker()
        self.tag = f"cimtest-{uuid.uuid4().hex[:10]}"
        self.exchange = f"{self.tag}.nodes"
        self.nodes: set[str] = set()
        self.addCleanup(self.delete_topology)

    def check_broker(self) -> None:
        address = parse_amqp_url(self.url)
        if not amqp_answers(address.host, address.port):
            service_missing(self, "RabbitMQ", f"nothing speaks AMQP at {address}")

    def node(self, name: str) -> str:
        node_id = f"{self.tag}-{name}"
        self.nodes.add(node_id)
        return node_id

    async def bus(self, node_id: str, *, start: bool = True, **options: Any) -> RabbitMqBus:
        options.setdefault("reconnect_delay", 0.1)
        options.setdefault("max_reconnect_delay", 0.5)
        bus = RabbitMqBus(
            reactor,
            options.pop("url", self.url),
            node_id,
            self.exchange,
            options.pop("confirm_timeout", CONFIRM_TIMEOUT),
            **options,
        )
        self.addCleanup(bus.stop)
        if start:
            await bus.start()
        return bus

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        async def holds() -> bool:
            return check()

        await eventually(reactor, holds, timeout, what)

    def blocking(self) -> Any:
        return pika.BlockingConnection(pika.URLParameters(self.url))

    def depth(self, node_id: str) -> int:
        """Messages ready in node_id's queue, asked of the broker directly."""
        connection = self.blocking()
        try:
            frame = connection.channel().queue_declare(node_queue(node_id), passive=True)
            count: int = frame.method.message_count
            return count
        finally:
            connection.close()

    def delete_topology(self) -> None:
        address = parse_amqp_url(self.url)
        if not amqp_answers(address.host, address.port):
            return
        connection = self.blocking()
        try:
            channel = connection.channel()
            for node_id in self.nodes:
                channel.queue_delete(node_queue(node_id))
            channel.exchange_delete(self.exchange)
        finally:
            connection.close()


class RabbitMqBusContractTests(RabbitFixture, BusContract):
    """The fixture first: its hooks replace the contract's placeholders."""


class RabbitMqBusTests(RabbitFixture):
    """What the RabbitMQ backend adds: confirms, returns, persistence, recovery."""

    async def test_publish_fires_once_the_broker_holds_the_message(self) -> None:
        a = await self.bus(self.node("a"))
        c_id = self.node("c")
        await self.bus(c_id)  # c's queue, nobody consuming it
        await a.publish(c_id, b"kept")
        self.assertEqual(self.depth(c_id), 1)  # no waiting: the confirm said so
        connection = self.blocking()
        try:
            _method, properties, body = connection.channel().basic_get(node_queue(c_id))
            self.assertEqual(body, b"kept")
            self.assertEqual(properties.delivery_mode, 2)  # persistent
        finally:
            connection.close()

    async def test_a_node_with_no_queue_is_returned_as_unavailable(self) -> None:
        a = await self.bus(self.node("a"))
        ghost = self.node("ghost")
        with self.assertRaises(BusUnavailable) as caught:
            await a.publish(ghost, b"nobody")
        self.assertIn("no queue", str(caught.exception))
        self.assertIn(ghost, str(caught.exception))
        # The return did not upset the channel: the next publish goes through.
        b_id = self.node("b")
        await self.bus(b_id)
        await a.publish(b_id, b"fine")

    async def test_returns_among_many_publishes_fail_only_their_own(self) -> None:
        a = await self.bus(self.node("a"))
        b_id, ghost = self.node("b"), self.node("ghost")
        b = await self.bus(b_id)
        got: list[bytes] = []
        b.consume(b_id, got.append)
        targets = [ghost if i % 3 == 0 else b_id for i in range(60)]
        outcomes = await defer.DeferredList(
            [a.publish(target, b"%d" % i) for i, target in enumerate(targets)],
            consumeErrors=True,
        )
        for target, (ok, result) in zip(targets, outcomes, strict=True):
            if target == ghost:
                self.assertFalse(ok)
                self.assertIsInstance(cast(Failure, result).value, BusUnavailable)
            else:
                self.assertTrue(ok, result)
        expected = [b"%d" % i for i, target in enumerate(targets) if target == b_id]
        await self.until(lambda: got == expected, "the routable messages")

    async def test_a_queue_deleted_under_its_consumer_comes_back(self) -> None:
        a = await self.bus(self.node("a"))
        b_id = self.node("b")
        b = await self.bus(b_id)
        got: list[bytes] = []
        b.consume(b_id, got.append)
        await a.publish(b_id, b"before")
        await self.until(lambda: got == [b"before"], "the first message")
        connection = self.blocking()
        try:
            connection.channel().queue_delete(node_queue(b_id))
        finally:
            connection.close()

        async def published() -> bool:
            try:
                await a.publish(b_id, b"after")
            except BusUnavailable:
                return False
            return True

        # The broker cancels b's consumer; b reconnects, declares its queue again and
        # consumes it, after which a's publishes are routable again.
        await eventually(reactor, published, 20, "b's queue to be declared again")
        await self.until(lambda: got[-1:] == [b"after"], "the message after")

    async def test_start_fails_with_a_wrong_password(self) -> None:
        address = parse_amqp_url(self.url)
        url = f"amqp://guest:not-{uuid.uuid4().hex[:6]}-s3cret@{address.host}:{address.port}/%2F"
        bus = await self.bus(self.node("a"), url=url, start=False, start_timeout=3.0)
        with self.assertRaises(BusUnavailable) as caught:
            await bus.start()
        message = str(caught.exception)
        self.assertIn(f"{address.host}:{address.port}", message)
        self.assertIn("ACCESS_REFUSED", message)
        self.assertNotIn("s3cret", message)


class RabbitMqStartTests(TestCase):
    """Start-up against nothing: needs no broker."""

    async def test_start_fails_in_bounded_time_when_nothing_listens(self) -> None:
        port = free_port()
        log = LogCapture(self, "cim.bus.rabbitmq")
        bus = RabbitMqBus(
            reactor,
            f"amqp://cim:s3cret@127.0.0.1:{port}/%2F",
            "n1",
            "cimtest.nodes",
            CONFIRM_TIMEOUT,
            start_timeout=1.0,
            reconnect_delay=0.05,
        )
        self.addCleanup(bus.stop)
        began = reactor.seconds()
        with self.assertRaises(BusUnavailable) as caught:
            await bus.start()
        self.assertLess(reactor.seconds() - began, 3.0)
        message = str(caught.exception)
        self.assertIn(f"127.0.0.1:{port}", message)
        self.assertIn("refused", message)
        self.assertNotIn("s3cret", message)
        self.assertNotIn("s3cret", repr([event for event in log.events]))
        self.assertEqual(len(log.lines("warn")), 1)
        # It gave up for good: publishes fail at once, nothing is retried.
        with self.assertRaises(BusUnavailable):
            await bus.publish("n1", b"x")
        self.assertFalse(bus.connected)


class RabbitMqOutageTests(RabbitFixture):
    """A private broker stopped, restarted and paused under running buses."""

    timeout = 180

    def check_broker(self) -> None:
        self.broker = shared_rabbitmq(self)
        self.url = self.broker.url

    async def test_buses_survive_a_broker_restart(self) -> None:
        log = LogCapture(self, "cim.bus.rabbitmq")
        a_id, b_id, c_id = self.node("a"), self.node("b"), self.node("c")
        a = await self.bus(a_id, max_reconnect_delay=1.0)
        b = await self.bus(b_id, max_reconnect_delay=1.0)
        c = await self.bus(c_id)
        got: list[bytes] = []
        held: list[Deferred[None]] = []

        def consumer(payload: bytes) -> Deferred[None] | None:
            got.append(payload)
            if payload == b"held" and got.count(b"held") == 1:
                held.append(Deferred())  # still being handled when the broker goes
                return held[-1]
            return None

        b.consume(b_id, consumer)
        await c.stop()  # c is away; its (durable) queue keeps what comes for it
        await a.publish(c_id, b"confirmed before the stop")
        await a.publish(b_id, b"held")
        await self.until(lambda: got == [b"held"], "the held message")

        await threads.deferToThread(self.broker.stop)
        await self.until(lambda: not a.connected and not b.connected, "the loss to be seen")
        began = reactor.seconds()
        with self.assertRaises(BusUnavailable):
            await a.publish(b_id, b"during")
        self.assertLess(reactor.seconds() - began, CONFIRM_TIMEOUT)  # at once, in fact
        held[0].callback(None)  # its ack cannot reach the broker any more

        await threads.deferToThread(self.broker.start)
        await self.until(lambda: a.connected and b.connected, "both buses to reconnect", 30)
        # b's consumer resumed by itself and gets the unacknowledged message again,
        # then what is published after the restart.
        await a.publish(b_id, b"after")
        await self.until(lambda: got[-2:] == [b"held", b"after"], "delivery after restart")
        self.assertNotIn(b"during", got)
        # The persistent message confirmed before the stop is still in c's queue.
        c2 = await self.bus(c_id)
        got_c: list[bytes] = []
        c2.consume(c_id, got_c.append)
        await self.until(lambda: got_c == [b"confirmed before the stop"], "c's message")

        # One line per change of state and link, however many attempts failed.
        lost = [e for e in log.lines("warn") if "lost the connection" in formatEvent(e)]
        back = [e for e in log.lines("info") if e.get("state") == "back"]
        self.assertEqual(len(lost), 2)  # a and b (c was stopped)
        self.assertEqual(len(back), 2)

    async def test_a_hung_broker_fails_publishes_within_the_confirm_timeout(self) -> None:
        a_id, b_id = self.node("a"), self.node("b")
        a = await self.bus(a_id, confirm_timeout=1.0)
        b = await self.bus(b_id)
        got: list[bytes] = []
        b.consume(b_id, got.append)
        self.broker.pause()
        self.addCleanup(self.broker.resume)
        began = reactor.seconds()
        with self.assertRaises(BusUnavailable) as caught:
            await a.publish(b_id, b"into the void")
        elapsed = reactor.seconds() - began
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 1.5)
        self.assertIn("did not confirm within 1 s", str(caught.exception))
        self.broker.resume()

        async def published() -> bool:
            try:
                await a.publish(b_id, b"after")
            except BusUnavailable:
                return False
            return True

        await eventually(reactor, published, 20, "a publish to be confirmed again")
        # The timed-out message may still arrive (the caller fell back already; the
        # client drops the duplicate): what matters is that the bus works again.
        await self.until(lambda: b"after" in got, "the message after the pause")

    async def test_a_silent_broker_is_noticed_and_left(self) -> None:
        log = LogCapture(self, "cim.bus.rabbitmq")
        a_id, b_id = self.node("a"), self.node("b")
        # A 2 s heartbeat so that a broker that says nothing is given up soon.
        a = await self.bus(a_id, url=self.url + "?heartbeat=2", max_reconnect_delay=1.0)
        await self.bus(b_id)
        self.broker.pause()
        self.addCleanup(self.broker.resume)
        began = reactor.seconds()
        # pika checks every heartbeat + 5 s and gives up at the second silent check.
        await self.until(lambda: not a.connected, "the silence to be noticed", 25)
        self.assertLess(reactor.seconds() - began, 2 * (2 + 5) + 2)
        with self.assertRaises(BusUnavailable):
            await a.publish(b_id, b"while silent")
        self.broker.resume()
        await self.until(lambda: a.connected, "the link to come back", 30)
        await a.publish(b_id, b"after")
        lost = [e for e in log.lines("warn") if "lost the connection" in formatEvent(e)]
        self.assertEqual(len(lost), 1)
        self.assertIn("heartbeat", lost[0]["why"].lower())


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
