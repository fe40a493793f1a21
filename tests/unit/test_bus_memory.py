"""The IMessageBus contract every backend keeps, and MemoryBus's own promises.

``BusContract`` holds the behaviour tests as coroutines; each backend mixes it into a
TestCase of its own (tests/integration/test_bus_rabbitmq.py runs it against real
RabbitMQ). The
memory backend runs it synchronously on a task.Clock: waiting means advancing the
clock, so a test that would need real time fails here instead of sleeping.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cim.backends.bus import MAX_DELIVERIES, PREFETCH, make_bus, redelivery_delay
from cim.backends.bus.memory import QUEUE_LIMIT, MemoryBroker, MemoryBus
from cim.config import QueueConfig
from cim.interfaces import BusUnavailable, IMessageBus
from tests.unit.test_state_memory import run_synchronously

if TYPE_CHECKING:
    _ContractBase = SynchronousTestCase
else:
    _ContractBase = object


class BusContract(_ContractBase):
    """Behaviour both backends promise. Subclasses provide the four hooks below."""

    async def bus(self, node_id: str, *, start: bool = True) -> IMessageBus:
        """A bus for node_id on the test's broker, stopped at cleanup."""
        raise NotImplementedError

    async def until(self, check: Callable[[], bool], what: str) -> None:
        """Let deliveries happen until check() holds; fail if it never does."""
        raise NotImplementedError

    def node(self, name: str) -> str:
        """A node id of this test's own (brokers may be shared between tests)."""
        raise NotImplementedError

    async def assert_unavailable(self, d: Deferred[Any]) -> BusUnavailable:
        try:
            await d
        except BusUnavailable as exc:
            return exc
        self.fail("expected BusUnavailable")

    async def test_provides_interface(self) -> None:
        bus = await self.bus(self.node("a"))
        self.assertTrue(verifyObject(IMessageBus, bus))

    async def test_a_message_reaches_the_consumer_of_its_node(self) -> None:
        a_id, b_id = self.node("a"), self.node("b")
        a, b = await self.bus(a_id), await self.bus(b_id)
        got_a: list[bytes] = []
        got_b: list[bytes] = []
        a.consume(a_id, got_a.append)
        b.consume(b_id, got_b.append)
        await a.publish(b_id, b"for b")
        await self.until(lambda: got_b == [b"for b"], "b's message")
        await b.publish(a_id, b"for a")
        await self.until(lambda: got_a == [b"for a"], "a's message")
        self.assertEqual(got_b, [b"for b"])

    async def test_messages_arrive_in_order(self) -> None:
        a_id, b_id = self.node("a"), self.node("b")
        a, b = await self.bus(a_id), await self.bus(b_id)
        got: list[bytes] = []
        b.consume(b_id, got.append)
        sent = [f"m{i}".encode() for i in range(100)]
        await defer.gatherResults([a.publish(b_id, payload) for payload in sent])
        await self.until(lambda: len(got) == len(sent), "100 messages")
        self.assertEqual(got, sent)

    async def test_a_message_is_acknowledged_only_after_the_consumer_fires(self) -> None:
        a_id, b_id = self.node("a"), self.node("b")
        a, b1 = await self.bus(a_id), await self.bus(b_id)
        held: list[Deferred[None]] = []

        def slow(payload: bytes) -> Deferred[None]:
            held.append(Deferred())
            return held[-1]

        b1.consume(b_id, slow)
        await a.publish(b_id, b"one")
        await self.until(lambda: len(held) == 1, "the first delivery")
        # The node dies before its consumer is done: the message is not lost.
        await b1.stop()
        b2 = await self.bus(b_id)
        got: list[bytes] = []
        b2.consume(b_id, got.append)
        await self.until(lambda: got == [b"one"], "the redelivery")
        held[0].callback(None)  # too late to count: it went to another consumer
        # b2 acknowledged it (its consumer returned): a third consumer gets only what
        # comes next, which would queue behind "one" had "one" not been acknowledged.
        await b2.stop()
        b3 = await self.bus(b_id)
        got3: list[bytes] = []
        b3.consume(b_id, got3.append)
        await a.publish(b_id, b"two")
        await self.until(lambda: got3 == [b"two"], "the next message")

    async def test_a_failing_consumer_gets_the_message_again(self) -> None:
        a_id, b_id = self.node("a"), self.node("b")
        a, b = await self.bus(a_id), await self.bus(b_id)
        calls: list[bytes] = []

        def flaky(payload: bytes) -> Deferred[None] | None:
            calls.append(payload)
            if len(calls) == 1:
                return defer.fail(RuntimeError("the database is down"))
            if len(calls) == 2:
                raise RuntimeError("still down")
            return None

        b.consume(b_id, flaky)
        await a.publish(b_id, b"again")
        await self.until(lambda: len(calls) == 3, "two redeliveries")
        self.assertEqual(calls, [b"again"] * 3)

    async def test_a_node_without_a_consumer_keeps_its_queue(self) -> None:
        a_id, c_id = self.node("a"), self.node("c")
        a = await self.bus(a_id)
        c1 = await self.bus(c_id)  # node c has been here: its queue exists
        await c1.stop()
        sent = [b"while", b"c", b"was away"]
        for payload in sent:
            await a.publish(c_id, payload)
        c2 = await self.bus(c_id)
        got: list[bytes] = []
        c2.consume(c_id, got.append)
        await self.until(lambda: len(got) == 3, "the queued messages")
        self.assertEqual(got, sent)

    async def test_a_consumer_registered_before_start_begins_at_start(self) -> None:
        a_id, b_id = self.node("a"), self.node("b")
        a = await self.bus(a_id)
        b = await self.bus(b_id, start=False)
        got: list[bytes] = []
        b.consume(b_id, got.append)
        await b.start()
        await a.publish(b_id, b"hello")
        await self.until(lambda: got == [b"hello"], "the message")

    async def test_publishing_to_a_node_that_never_was_fails(self) -> None:
        a = await self.bus(self.node("a"))
        error = await self.assert_unavailable(a.publish(self.node("ghost"), b"lost?"))
        self.assertIn("no queue", str(error))

    async def test_publishing_before_start_fails(self) -> None:
        b_id = self.node("b")
        await self.bus(b_id)
        a = await self.bus(self.node("a"), start=False)
        await self.assert_unavailable(a.publish(b_id, b"too early"))


class LogCapture:
    def __init__(self, test: SynchronousTestCase, namespace: str) -> None:
        self.events: list[LogEvent] = []
        self.namespace = namespace
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self, level: str | None = None) -> list[LogEvent]:
        return [
            event
            for event in self.events
            if event.get("log_namespace") == self.namespace
            and (level is None or event["log_level"].name == level)
        ]


@run_synchronously
class MemoryBusContractTests(BusContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(self.clock)

    async def bus(self, node_id: str, *, start: bool = True) -> IMessageBus:
        bus = MemoryBus(self.clock, node_id, self.broker)
        self.addCleanup(bus.stop)
        if start:
            await bus.start()
        return bus

    async def until(self, check: Callable[[], bool], what: str) -> None:
        for _ in range(2000):  # 100 s of clock time, in steps
            if check():
                return
            self.clock.advance(0.05)
        self.fail(f"no {what} after 100 s of clock time")

    def node(self, name: str) -> str:
        return name


class MemoryBusTests(SynchronousTestCase):
    """What only the embedded backend promises: re-entrancy, bounds, the give-up."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.log = LogCapture(self, "cim.bus.memory")

    def started(self, node_id: str, broker: MemoryBroker) -> MemoryBus:
        bus = MemoryBus(self.clock, node_id, broker)
        self.successResultOf(bus.start())
        self.addCleanup(bus.stop)
        return bus

    def test_publish_fires_at_once_and_delivers_later(self) -> None:
        broker = MemoryBroker(self.clock)
        a, b = self.started("a", broker), self.started("b", broker)
        got: list[bytes] = []
        b.consume("b", got.append)
        self.successResultOf(a.publish("b", b"x"))
        self.assertEqual(got, [])  # never inside publish()
        self.clock.advance(0)
        self.assertEqual(got, [b"x"])

    def test_a_consumer_that_publishes_does_not_recurse(self) -> None:
        broker = MemoryBroker(self.clock)
        a = self.started("a", broker)
        got: list[int] = []

        def echo(payload: bytes) -> None:
            got.append(int(payload))
            if int(payload) < 5000:  # deeper than the recursion limit, were it recursive
                a.publish("a", str(int(payload) + 1).encode())

        a.consume("a", echo)
        self.successResultOf(a.publish("a", b"0"))
        for _ in range(5001):
            self.clock.advance(0)
        self.assertEqual(got, list(range(5001)))

    def test_the_default_bus_has_a_broker_of_its_own(self) -> None:
        one, two = MemoryBus(self.clock, "n1"), MemoryBus(self.clock, "n1")
        self.assertIsNot(one.broker, two.broker)

    def test_a_full_queue_refuses_more_and_says_so_once(self) -> None:
        broker = MemoryBroker(self.clock, limit=3)
        a = self.started("a", broker)
        self.started("b", broker)  # b's queue, nobody consuming
        for i in range(3):
            self.successResultOf(a.publish("b", b"%d" % i))
        for _ in range(2):
            failure = self.failureResultOf(a.publish("b", b"more"), BusUnavailable)
            self.assertIn("full", str(failure.value))
        self.assertEqual(len(self.log.lines("warn")), 1)
        self.assertEqual(broker.queued("b"), 3)
        b2 = self.started("b", broker)
        got: list[bytes] = []
        b2.consume("b", got.append)
        self.clock.advance(0)
        self.assertEqual(got, [b"0", b"1", b"2"])
        self.successResultOf(a.publish("b", b"room again"))

    def test_the_default_bound_is_large(self) -> None:
        self.assertGreaterEqual(QUEUE_LIMIT, 100_000)

    def test_a_consumer_holds_at_most_prefetch_messages(self) -> None:
        broker = MemoryBroker(self.clock, prefetch=2)
        a = self.started("a", broker)
        held: list[Deferred[None]] = []

        def slow(payload: bytes) -> Deferred[None]:
            held.append(Deferred())
            return held[-1]

        a.consume("a", slow)
        for i in range(5):
            a.publish("a", b"%d" % i)
        self.clock.advance(0)
        self.assertEqual(len(held), 2)
        held[0].callback(None)
        self.clock.advance(0)
        self.assertEqual(len(held), 3)
        self.assertEqual(broker.queued("a"), 2)

    def test_the_default_prefetch_bounds_what_a_consumer_holds(self) -> None:
        broker = MemoryBroker(self.clock)
        a = self.started("a", broker)
        held: list[Deferred[None]] = []

        def slow(payload: bytes) -> Deferred[None]:
            held.append(Deferred())
            return held[-1]

        a.consume("a", slow)
        for i in range(PREFETCH + 10):
            a.publish("a", b"%d" % i)
        self.clock.advance(0)
        self.assertEqual(len(held), PREFETCH)

    def test_stopping_puts_held_messages_back_in_order(self) -> None:
        broker = MemoryBroker(self.clock)
        a = self.started("a", broker)
        b1 = self.started("b", broker)
        b1.consume("b", lambda payload: Deferred())
        for i in range(3):
            a.publish("b", b"%d" % i)
        self.clock.advance(0)
        self.assertEqual(broker.queued("b"), 0)
        a.publish("b", b"3")
        self.successResultOf(b1.stop())
        self.assertEqual(broker.queued("b"), 4)
        b2 = self.started("b", broker)
        got: list[bytes] = []
        b2.consume("b", got.append)
        self.clock.advance(0)
        self.assertEqual(got, [b"0", b"1", b"2", b"3"])

    def test_a_message_its_consumer_always_fails_is_dropped_with_an_error(self) -> None:
        broker = MemoryBroker(self.clock)
        a = self.started("a", broker)
        b = self.started("node-b", broker)
        calls: list[bytes] = []

        def poisoned(payload: bytes) -> None:
            calls.append(payload)
            if payload == b"poison":
                raise ValueError("cannot parse")

        b.consume("node-b", poisoned)
        a.publish("node-b", b"poison")
        a.publish("node-b", b"fine")
        self.clock.advance(0)
        # The good message is not held up behind the failing one.
        self.assertEqual(calls, [b"poison", b"fine"])
        waited = 0.0
        for failures in range(1, MAX_DELIVERIES):
            self.clock.advance(redelivery_delay(failures))
            waited += redelivery_delay(failures)
        self.assertEqual(calls.count(b"poison"), MAX_DELIVERIES)
        self.assertLess(waited, 60)
        self.clock.advance(600)
        self.assertEqual(calls.count(b"poison"), MAX_DELIVERIES)  # never again
        self.assertEqual(len(self.log.lines("warn")), MAX_DELIVERIES - 1)
        [error] = self.log.lines("error")
        self.assertEqual(error["node"], "node-b")
        self.assertEqual(broker.queued("node-b"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_two_consumers_of_one_node_share_its_messages(self) -> None:
        broker = MemoryBroker(self.clock)
        a = self.started("a", broker)
        one: list[bytes] = []
        two: list[bytes] = []
        a.consume("a", one.append)
        a.consume("a", two.append)
        for i in range(4):
            a.publish("a", b"%d" % i)
        self.clock.advance(0)
        self.assertEqual(sorted(one + two), [b"0", b"1", b"2", b"3"])
        self.assertTrue(one and two)

    def test_stop_then_start_resumes_the_consumers(self) -> None:
        broker = MemoryBroker(self.clock)
        a = self.started("a", broker)
        got: list[bytes] = []
        a.consume("a", got.append)
        self.successResultOf(a.stop())
        self.failureResultOf(a.publish("a", b"stopped"), BusUnavailable)
        self.successResultOf(a.start())
        self.successResultOf(a.publish("a", b"back"))
        self.clock.advance(0)
        self.assertEqual(got, [b"back"])


class MakeBusTests(SynchronousTestCase):
    def test_memory_is_the_default(self) -> None:
        bus = make_bus(QueueConfig(), "n1", Clock())
        self.assertIsInstance(bus, MemoryBus)
        self.assertTrue(verifyObject(IMessageBus, bus))

    def test_rabbitmq_is_built_unstarted(self) -> None:
        from cim.backends.bus.rabbitmq import RabbitMqBus

        reactor = MemoryReactorClock()
        config = QueueConfig(
            backend="rabbitmq",
            amqp_url="amqp://cim:s3cret@mq.example:5673/cim",
            exchange="cim.test",
            confirm_timeout=2.0,
        )
        bus = make_bus(config, f"n-{uuid.uuid4().hex[:6]}", reactor)
        self.assertIsInstance(bus, RabbitMqBus)
        self.assertTrue(verifyObject(IMessageBus, bus))
        self.assertEqual(reactor.tcpClients, [])  # nothing connects before start()
        self.assertNotIn("s3cret", repr(vars(bus)))
