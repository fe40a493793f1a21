"""One connection to RabbitMQ that keeps its declarations and consumers alive.

The node bus, the offline pipeline and the archive all host their queues on an
``AmqpLink``: declarations, confirmed publishes and consumers, re-applied on every
connection of the reconnecting link under it (``cim.backends.link.Link``).

pika's Twisted adapter is wrapped rather than used as it comes, because its defaults
bite a server (the connection-level part of the list is in ``cim.backends.bus.amqp``):

- it never reconnects: here the link reconnects forever with the one backoff policy,
  re-declares the topology, re-enables confirms and resumes every consumer, logging
  one line per change of state rather than per attempt;
- its publish Deferreds wait for a confirm forever, and calls made while disconnected
  would wait too: here every publish has a deadline and fails at once while the broker
  is away, and the number of messages waiting for a confirm is capped, so an outage
  cannot pile messages up in memory;
- in confirm mode it pins a returned (unroutable) message on whichever delivery the
  next ack settles first, which with a multiple ack can be another message: here
  returns are matched to their own message by message id;
- a consumer that fails a message gets it back at once, forever, from a nack with
  requeue: here the nack waits a growing pause, and after ``MAX_DELIVERIES`` failures
  the message is dropped with an error naming its queue (the memory bus does the same).

Every pika call runs on the reactor thread: everything here runs from reactor events.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.twisted_connection import ClosableDeferredQueue
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.backends.bus import MAX_DELIVERIES, PREFETCH, call_consumer, redelivery_delay
from cim.backends.bus.amqp import (
    CONNECT_TIMEOUT,
    AmqpConnections,
    AmqpProtocol,
    AmqpSession,
    parse_amqp_url,
)
from cim.backends.bus.broker import Binding, Declaration, Exchange, Queue
from cim.backends.link import Link, LinkReport, LinkStopped, describe
from cim.interfaces import BusConsumer, BusUnavailable
from cim.reactor import ICimReactor

__all__ = ["FAILURE_MEMORY", "MAX_UNCONFIRMED", "START_TIMEOUT", "AmqpLink"]

START_TIMEOUT = 10.0
"""Seconds ``start`` waits for a first usable connection before giving up."""
MAX_UNCONFIRMED = 10_000
"""Publishes waiting for the broker's confirm before further ones fail at once."""
FAILURE_MEMORY = 10_000
"""Failed message ids remembered to count redeliveries."""
RECONNECT_JITTER = 0.2
"""Reconnects wait 80-100 % of the backoff step: a fleet does not return in lockstep."""

_log = Logger(namespace="cim.bus.rabbitmq")


@dataclass(eq=False)
class _Subscription:
    queue: str
    consumer: BusConsumer
    prefetch: int


@dataclass(eq=False)
class _Publish:
    message_id: str
    result: Deferred[None]
    exchange: str
    routing_key: str
    timer: IDelayedCall | None = None
    returned: str | None = None


class AmqpLink:
    """One connection to RabbitMQ that keeps its declarations and consumers alive.

    ``declare`` and ``consume`` are remembered and re-applied on every connection;
    ``publish`` needs the connection to be up now and fails at once otherwise.
    ``connection`` is the reconnecting link underneath (its backoff, its state).
    """

    def __init__(
        self,
        reactor: ICimReactor,
        amqp_url: str,
        *,
        confirm_timeout: float,
        name: str = "bus",
        connection_name: str = "cim",
        connect_timeout: float = CONNECT_TIMEOUT,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 5.0,
        max_unconfirmed: int = MAX_UNCONFIRMED,
    ) -> None:
        self.reactor = reactor
        self.address = parse_amqp_url(amqp_url, connection_name)
        self._name = name
        self._confirm_timeout = confirm_timeout
        self._max_unconfirmed = max_unconfirmed
        self.connection: Link[AmqpProtocol, AmqpSession] = Link(
            reactor,
            AmqpConnections(reactor, self.address, connect_timeout, self._open),
            Backoff(reconnect_delay, max_reconnect_delay, jitter=RECONNECT_JITTER),
            LinkReport(_log, name, f"connection to RabbitMQ at {self.address}", "publishing fails"),
            attempt_timeout=connect_timeout,
        )
        self._setup: list[Declaration | _Subscription] = []
        """Applied in this order on every connection: a queue before its binding and
        its consumer."""
        self._unconfirmed: dict[str, _Publish] = {}
        self._at_broker = 0
        self._failed_counts: OrderedDict[str, int] = OrderedDict()

    @property
    def connected(self) -> bool:
        """Whether publishes can reach the broker right now."""
        return self.connection.connected

    @property
    def last_error(self) -> str | None:
        return self.connection.last_error

    # --- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> Deferred[None]:
        """Connect; fails with BusUnavailable if no usable connection comes in time.

        Only start-up insists on the broker: once started, the link survives outages.
        """
        self.connection.start()
        ready = self.connection.when_ready()
        ready.addTimeout(timeout, self.reactor)

        def failed(failure: Failure) -> Deferred[None]:
            if failure.check(LinkStopped):
                return defer.fail(BusUnavailable("the bus was stopped"))  # stopped meanwhile
            why = self.connection.last_error or "no answer"
            stopped = self.stop()

            def unavailable(_: object) -> None:
                raise BusUnavailable(
                    f"cannot reach RabbitMQ at {self.address} within {timeout:g} s ({why})"
                )

            return stopped.addCallback(unavailable)

        return ready.addCallbacks(lambda _: None, failed)

    def stop(self) -> Deferred[None]:
        """Close the connection (cleanly if the broker answers) and stop reconnecting."""
        return self.connection.stop()

    # --- what to keep declared, and consumers -----------------------------------------

    def declare(self, *declarations: Declaration) -> Deferred[None]:
        """Keep these declared on every connection; applied now if connected.

        The result fails if the broker refuses a declaration now; the link then
        reconnects and keeps trying, reporting the refusal as its reason.
        """
        new = [item for item in declarations if item not in self._setup]
        self._setup.extend(new)
        session = self.connection.usable
        if session is None or not new:
            return defer.succeed(None)
        return self._serially(session, lambda: self._apply(session, new))

    def consume(self, queue: str, consumer: BusConsumer, prefetch: int = PREFETCH) -> None:
        """Hand queue's messages to consumer on every connection, acknowledging each
        after consumer's Deferred fires; a failure brings the message back later."""
        subscription = _Subscription(queue, consumer, prefetch)
        self._setup.append(subscription)
        session = self.connection.usable
        if session is not None:
            d = self._serially(session, lambda: self._apply(session, [subscription]))
            d.addErrback(lambda _: None)  # _broken logged it; the next connection retries

    def _serially(
        self, session: AmqpSession, step: Callable[[], Coroutine[Any, Any, None]]
    ) -> Deferred[None]:
        def run() -> Deferred[None]:
            if self.connection.usable is not session:
                return defer.succeed(None)  # the next connection applies everything
            return Deferred.fromCoroutine(step())

        d: Deferred[None] = session.serial.run(run)
        return d.addErrback(self._broken, session)

    # --- publishing -------------------------------------------------------------------

    def publish(
        self, exchange: str, routing_key: str, body: bytes, *, mandatory: bool = True
    ) -> Deferred[None]:
        """A persistent message; fires on the broker's confirm, else BusUnavailable."""
        session = self.connection.usable
        if session is None:
            return defer.fail(BusUnavailable(self._unreachable()))
        if self._at_broker >= self._max_unconfirmed:
            return defer.fail(
                BusUnavailable(
                    f"{self._at_broker} messages are waiting for RabbitMQ's confirm at "
                    f"{self.address}"
                )
            )
        message_id = uuid.uuid4().hex
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, message_id=message_id
        )
        try:
            confirmed: Deferred[Any] = session.publisher.basic_publish(
                exchange, routing_key, body, properties, mandatory
            )
        except Exception as exc:  # pika raises when the channel is closing
            return defer.fail(BusUnavailable(f"RabbitMQ at {self.address}: {exc}"))
        self._at_broker += 1
        pending = _Publish(message_id, Deferred(), exchange, routing_key)
        self._unconfirmed[message_id] = pending
        pending.timer = self.reactor.callLater(self._confirm_timeout, self._too_late, pending)
        confirmed.addBoth(self._settled, pending)
        return pending.result

    def _returned(self, message: Any) -> None:
        """Basic.Return: RabbitMQ sends it before the ack of the same message."""
        pending = self._unconfirmed.get(getattr(message.properties, "message_id", None) or "")
        if pending is not None:
            pending.returned = f"{message.method.reply_code} {message.method.reply_text}"

    def _settled(self, outcome: Any, pending: _Publish) -> None:
        self._at_broker -= 1
        self._unconfirmed.pop(pending.message_id, None)
        _cancel(pending.timer)
        if pending.result.called:
            return  # already failed by the deadline
        if isinstance(outcome, Failure):
            if outcome.check(pika.exceptions.NackError):
                error = BusUnavailable(f"RabbitMQ at {self.address} refused the message (nack)")
            elif outcome.check(pika.exceptions.UnroutableError):
                # Only says some message settled by this ack was returned: which one
                # is decided by ``returned`` below.
                error = None
            else:
                error = BusUnavailable(
                    f"the connection to RabbitMQ at {self.address} failed before the "
                    f"confirm ({describe(outcome)})"
                )
            if error is not None:
                pending.result.errback(error)
                return
        if pending.returned is not None:
            pending.result.errback(
                BusUnavailable(
                    f"no queue takes routing key {pending.routing_key!r} on exchange "
                    f"{pending.exchange!r} ({pending.returned})"
                )
            )
            return
        pending.result.callback(None)

    def _too_late(self, pending: _Publish) -> None:
        pending.timer = None
        self._unconfirmed.pop(pending.message_id, None)
        if not pending.result.called:
            pending.result.errback(
                BusUnavailable(
                    f"RabbitMQ at {self.address} did not confirm within {self._confirm_timeout:g} s"
                )
            )

    def _unreachable(self) -> str:
        last_error = self.connection.last_error
        if not self.connection.tried and last_error is None:
            return f"the {self._name} is not connected to RabbitMQ at {self.address}"
        detail = f" ({last_error})" if last_error else ""
        return f"RabbitMQ at {self.address} is unreachable{detail}"

    # --- consuming --------------------------------------------------------------------

    async def _start_consumer(self, session: AmqpSession, subscription: _Subscription) -> None:
        channel = await session.protocol.channel()
        self._watch(session, channel, f"the channel consuming {subscription.queue!r}")
        await channel.basic_qos(prefetch_count=subscription.prefetch)
        messages, _tag = await channel.basic_consume(subscription.queue, auto_ack=False)
        Deferred.fromCoroutine(self._pump(session, channel, messages, subscription))

    async def _pump(
        self,
        session: AmqpSession,
        channel: Any,
        messages: ClosableDeferredQueue,
        subscription: _Subscription,
    ) -> None:
        while True:
            try:
                message = await messages.get()
            except Exception as exc:
                if self.connection.usable is session and isinstance(
                    exc, pika.exceptions.ConsumerCancelled
                ):
                    # The broker cancelled us (the queue was deleted): a new connection
                    # declares the queue again and resumes consuming.
                    self._broken(Failure(exc), session)
                return  # else the channel closed with the connection: a new one follows
            self._deliver(session, channel, subscription, message)

    def _deliver(
        self, session: AmqpSession, channel: Any, subscription: _Subscription, message: Any
    ) -> None:
        tag = message.method.delivery_tag
        key = message.properties.message_id or hashlib.sha256(message.body).hexdigest()
        d = call_consumer(subscription.consumer, message.body)

        def done(_: object) -> None:
            self._failed_counts.pop(key, None)
            if channel.is_open:
                channel.basic_ack(tag)
            # else the broker delivers it again on the next connection

        def failed(failure: Failure) -> None:
            count = self._failed_counts.pop(key, 0) + 1
            if count >= MAX_DELIVERIES:
                _log.error(
                    "bus: dropping a message from queue {queue!r}: its consumer failed it "
                    "{count} times, last with {why}",
                    queue=subscription.queue,
                    count=count,
                    why=describe(failure),
                )
                if channel.is_open:
                    channel.basic_nack(tag, requeue=False)
                return
            self._failed_counts[key] = count
            if len(self._failed_counts) > FAILURE_MEMORY:
                self._failed_counts.popitem(last=False)
            delay = redelivery_delay(count)
            _log.warn(
                "bus: the consumer of queue {queue!r} failed a message ({why}); it comes "
                "again in {delay:g} s (failure {count} of {limit})",
                queue=subscription.queue,
                why=describe(failure),
                delay=delay,
                count=count,
                limit=MAX_DELIVERIES,
            )
            call: IDelayedCall

            def requeue() -> None:
                session.timers.discard(call)
                if channel.is_open:
                    channel.basic_nack(tag, requeue=True)

            # Holding the message (and its prefetch slot) for a while before handing it
            # back keeps a consumer that fails everything from spinning the broker.
            call = self.reactor.callLater(delay, requeue)
            session.timers.add(call)

        d.addCallbacks(done, failed)

    # --- a new connection (the link's prepare step) -----------------------------------

    def _open(self, protocol: AmqpProtocol) -> Deferred[AmqpSession]:
        return Deferred.fromCoroutine(self._open_session(protocol))

    async def _open_session(self, protocol: AmqpProtocol) -> AmqpSession:
        await protocol.ready
        publisher = await protocol.channel()
        session = AmqpSession(protocol, publisher)
        self._watch(session, publisher, "the publishing channel")
        publisher.add_on_return_callback(self._returned)
        await publisher.confirm_delivery()
        done = 0
        # By index: what is added while this runs is applied too, before the session
        # counts as usable (nothing can slip in between the last step and the link
        # taking it).
        while done < len(self._setup):
            await self._apply(session, [self._setup[done]])
            done += 1
        return session

    async def _apply(
        self, session: AmqpSession, items: Iterable[Declaration | _Subscription]
    ) -> None:
        channel = session.publisher
        for item in items:
            if isinstance(item, _Subscription):
                await self._start_consumer(session, item)
            elif isinstance(item, Exchange):
                await channel.exchange_declare(
                    exchange=item.name, exchange_type=item.kind, durable=item.durable
                )
            elif isinstance(item, Queue):
                await channel.queue_declare(
                    queue=item.name, durable=item.durable, arguments=dict(item.arguments)
                )
            elif isinstance(item, Binding):
                await channel.queue_bind(
                    queue=item.queue, exchange=item.exchange, routing_key=item.routing_key
                )

    def _watch(self, session: AmqpSession, channel: Any, what: str) -> None:
        """A channel the broker closes (an error on it) takes the connection down with
        it, so the next connection starts clean with every channel and consumer."""

        def closed(reason: object) -> None:
            if self.connection.usable is session and not session.protocol.lost:
                self._broken(Failure(BusUnavailable(f"RabbitMQ closed {what}: {reason}")), session)

        channel.on_closed.addBoth(closed)

    def _broken(self, failure: Failure, session: AmqpSession) -> Failure:
        if self.connection.usable is session:
            self.connection.drop(describe(failure))
        return failure


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()
