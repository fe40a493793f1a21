"""The embedded IMessageBus: a broker object in this process, with RabbitMQ's semantics.

A ``MemoryBroker`` holds a queue per node id; every ``MemoryBus`` attached to it is one
node. The daemon's default makes a broker of its own (one process, one node); tests
attach several buses to one broker to run a cluster in memory. The broker behaves like
the RabbitMQ backend wherever a caller could tell the difference:

- a node's queue exists once that node's bus has started (or something consumed it);
  a message for a node that never had a queue fails with BusUnavailable, as an
  unroutable mandatory publish does on RabbitMQ, so the caller falls back;
- a queue keeps its messages while nobody consumes it, up to ``QUEUE_LIMIT``, beyond
  which publishing fails (memory stays bounded; the caller hears about it);
- each consumer has at most ``PREFETCH`` unacknowledged messages; a message is done
  when the consumer's Deferred fires, comes again when it fails (after a pause, up to
  ``MAX_DELIVERIES`` times), and goes back to its queue when the consuming bus stops.

``publish`` fires at once: once the message is in the broker's queue the bus holds it
as durably as an in-process bus can. Delivery to consumers always happens later, from
the clock (``callLater(0)``), never inside ``publish``: a consumer that publishes in
turn cannot recurse, and a publisher never sees its consumer's effects before
``publish`` returns, as with a real broker.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.backends.bus import MAX_DELIVERIES, PREFETCH, call_consumer, describe, redelivery_delay
from cim.interfaces import BusConsumer, BusUnavailable, IMessageBus

QUEUE_LIMIT = 100_000
"""Messages waiting in one node's queue before publishing to it fails."""

_log = Logger(namespace="cim.bus.memory")


class _Envelope:
    __slots__ = ("failures", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.failures = 0


class _Delivery:
    """One hand-over of a message to a consumer; a stale one's outcome is ignored."""

    __slots__ = ("envelope",)

    def __init__(self, envelope: _Envelope) -> None:
        self.envelope = envelope


class _Subscription:
    def __init__(self, node_id: str, consumer: BusConsumer, prefetch: int) -> None:
        self.node_id = node_id
        self.consumer = consumer
        self.prefetch = prefetch
        self.active = True
        self.in_flight: OrderedDict[_Delivery, None] = OrderedDict()


class _Queue:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.ready: deque[_Envelope] = deque()
        self.subscriptions: list[_Subscription] = []
        self.turn = 0
        self.dispatch: IDelayedCall | None = None
        self.waiting: dict[IDelayedCall, _Envelope] = {}
        self.full = False


class MemoryBroker:
    """In-process queues shared by the MemoryBus instances attached to it."""

    def __init__(
        self, clock: IReactorTime, limit: int = QUEUE_LIMIT, prefetch: int = PREFETCH
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._prefetch = prefetch
        self._queues: dict[str, _Queue] = {}

    def declare(self, node_id: str) -> None:
        """Make sure node_id has a queue (idempotent, like a durable queue declare)."""
        if node_id not in self._queues:
            self._queues[node_id] = _Queue(node_id)

    def queued(self, node_id: str) -> int:
        """Messages waiting for node_id (not counting those a consumer holds)."""
        queue = self._queues.get(node_id)
        return 0 if queue is None else len(queue.ready) + len(queue.waiting)

    def publish(self, node_id: str, payload: bytes) -> None:
        """Enqueue, or raise BusUnavailable when node_id has no queue or it is full."""
        queue = self._queues.get(node_id)
        if queue is None:
            raise BusUnavailable(f"no queue for node {node_id!r} on the bus")
        if len(queue.ready) >= self._limit:
            if not queue.full:
                queue.full = True
                _log.warn(
                    "bus: the queue of node {node!r} holds {limit} messages; publishing "
                    "to it fails until its consumer catches up",
                    node=node_id,
                    limit=self._limit,
                )
            raise BusUnavailable(f"the queue of node {node_id!r} is full ({self._limit})")
        queue.ready.append(_Envelope(bytes(payload)))
        self._schedule(queue)

    def subscribe(self, node_id: str, consumer: BusConsumer) -> Callable[[], None]:
        """Start handing node_id's messages to consumer; returns the unsubscriber.

        Unsubscribing puts the messages the consumer still holds back at the head of
        the queue, in order: they were not acknowledged, so they come again.
        """
        self.declare(node_id)
        queue = self._queues[node_id]
        subscription = _Subscription(node_id, consumer, self._prefetch)
        queue.subscriptions.append(subscription)
        self._schedule(queue)

        def unsubscribe() -> None:
            if not subscription.active:
                return
            subscription.active = False
            queue.subscriptions.remove(subscription)
            for delivery in reversed(subscription.in_flight):
                # An interrupted delivery is not the consumer's failure.
                queue.ready.appendleft(delivery.envelope)
            subscription.in_flight.clear()
            self._schedule(queue)

        return unsubscribe

    # --- dispatch ---------------------------------------------------------------------

    def _schedule(self, queue: _Queue) -> None:
        if queue.dispatch is None and queue.ready and queue.subscriptions:
            queue.dispatch = self._clock.callLater(0, self._dispatch, queue)

    def _dispatch(self, queue: _Queue) -> None:
        # queue.dispatch stays set while the loop runs, so consumers that finish at
        # once (or publish to this queue) do not schedule a second pass meanwhile.
        try:
            self._hand_out(queue)
        finally:
            queue.dispatch = None

    def _hand_out(self, queue: _Queue) -> None:
        while queue.ready:
            subscription = self._next_with_room(queue)
            if subscription is None:
                return
            envelope = queue.ready.popleft()
            if queue.full and len(queue.ready) < self._limit:
                queue.full = False
                _log.info("bus: the queue of node {node!r} has room again", node=queue.node_id)
            delivery = _Delivery(envelope)
            subscription.in_flight[delivery] = None
            d = call_consumer(subscription.consumer, envelope.payload)
            d.addCallbacks(
                self._done,
                self._failed,
                callbackArgs=(queue, subscription, delivery),
                errbackArgs=(queue, subscription, delivery),
            )

    def _next_with_room(self, queue: _Queue) -> _Subscription | None:
        """Round-robin over the consumers that have prefetch room left."""
        count = len(queue.subscriptions)
        for step in range(count):
            index = (queue.turn + step) % count
            subscription = queue.subscriptions[index]
            if len(subscription.in_flight) < subscription.prefetch:
                queue.turn = (index + 1) % count
                return subscription
        return None

    def _done(
        self, _: object, queue: _Queue, subscription: _Subscription, delivery: _Delivery
    ) -> None:
        if delivery in subscription.in_flight:
            del subscription.in_flight[delivery]
            self._schedule(queue)

    def _failed(
        self, failure: Failure, queue: _Queue, subscription: _Subscription, delivery: _Delivery
    ) -> None:
        if delivery not in subscription.in_flight:
            return  # the consumer was unsubscribed meanwhile: the message is back already
        del subscription.in_flight[delivery]
        envelope = delivery.envelope
        envelope.failures += 1
        if envelope.failures >= MAX_DELIVERIES:
            _log.error(
                "bus: dropping a message for node {node!r}: its consumer failed it "
                "{count} times, last with {why}",
                node=queue.node_id,
                count=envelope.failures,
                why=describe(failure),
            )
            self._schedule(queue)
            return
        delay = redelivery_delay(envelope.failures)
        _log.warn(
            "bus: the consumer of node {node!r} failed a message ({why}); it comes "
            "again in {delay:g} s (failure {count} of {limit})",
            node=queue.node_id,
            why=describe(failure),
            delay=delay,
            count=envelope.failures,
            limit=MAX_DELIVERIES,
        )
        call: IDelayedCall

        def again() -> None:
            del queue.waiting[call]
            queue.ready.appendleft(envelope)
            self._schedule(queue)

        call = self._clock.callLater(delay, again)
        queue.waiting[call] = envelope
        # The failed message held a prefetch slot: the next ones may go meanwhile.
        self._schedule(queue)


@implementer(IMessageBus)
class MemoryBus:
    """One node's view of a MemoryBroker (its own one unless a broker is given)."""

    def __init__(
        self, clock: IReactorTime, node_id: str, broker: MemoryBroker | None = None
    ) -> None:
        self._node_id = node_id
        self.broker = broker if broker is not None else MemoryBroker(clock)
        self._consumers: list[tuple[str, BusConsumer]] = []
        self._unsubscribers: list[Callable[[], None]] = []
        self._running = False

    def start(self) -> Deferred[None]:
        """Declare this node's queue and start the consumers registered so far."""
        if not self._running:
            self._running = True
            self.broker.declare(self._node_id)
            for node_id, consumer in self._consumers:
                self._unsubscribers.append(self.broker.subscribe(node_id, consumer))
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        """Stop consuming; what the consumers still held goes back to the queues."""
        self._running = False
        unsubscribers, self._unsubscribers = self._unsubscribers, []
        for unsubscribe in unsubscribers:
            unsubscribe()
        return defer.succeed(None)

    def publish(self, node_id: str, payload: bytes) -> Deferred[None]:
        if not self._running:
            return defer.fail(BusUnavailable("the bus is not started"))
        try:
            self.broker.publish(node_id, payload)
        except BusUnavailable as exc:
            return defer.fail(exc)
        return defer.succeed(None)

    def consume(self, node_id: str, consumer: BusConsumer) -> None:
        self._consumers.append((node_id, consumer))
        if self._running:
            self._unsubscribers.append(self.broker.subscribe(node_id, consumer))
