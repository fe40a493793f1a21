"""The distributed IMessageBus on RabbitMQ, and the connection it (and later queues) run on.

Topology: one durable direct exchange (``[queue] exchange``); a durable queue per node,
``cim.node.<id>``, bound with the node id as routing key. Messages are persistent and
published ``mandatory`` on a channel in confirm mode, so ``publish`` fires only once
the broker has the message in the node's queue, and fails with BusUnavailable when the
broker refuses it, no queue is bound for the node, no confirm comes in time, or the
broker is unreachable. Consumers acknowledge manually, after the consumer's Deferred
fires, with a prefetch window.

pika's Twisted adapter is wrapped rather than used as it comes, because its defaults
bite a server:

- it never reconnects: here ``AmqpLink`` reconnects forever with a capped, jittered
  backoff, re-declares the topology, re-enables confirms and resumes every consumer,
  logging one line per change of state rather than per attempt;
- its publish Deferreds wait for a confirm forever, and calls made while disconnected
  would wait too: here every publish has a deadline and fails at once while the broker
  is away, and the number of messages waiting for a confirm is capped, so an outage
  cannot pile messages up in memory;
- in confirm mode it pins a returned (unroutable) message on whichever delivery the
  next ack settles first, which with a multiple ack can be another message: here
  returns are matched to their own message by message id;
- a connection the broker refuses or closes loses the broker's reason (wrong password,
  unknown vhost, shutdown), replaced by "closed cleanly" or a bare count of attempts:
  here the reason is kept for the log and for ``start``;
- it ends a connection with loseConnection, which waits for unsent data to drain, so
  a hung broker could hold a dead connection open forever: here it is cut after
  ``CLOSE_TIMEOUT``; and it takes the broker's heartbeat (60 s) unless told: here
  ``DEFAULT_HEARTBEAT``, so a silent broker is left within half a minute;
- a consumer that fails a message gets it back at once, forever, from a nack with
  requeue: here the nack waits a growing pause, and after ``MAX_DELIVERIES`` failures
  the message is dropped with an error naming its queue (the memory bus does the same);
- it logs through the stdlib at ERROR on every connection loss, duplicating (per
  attempt) what this module reports once: its logger is quieted unless configured.

Every pika call runs on the reactor thread: everything here runs from reactor events.
``AmqpLink`` is generic (declarations, confirmed publishes, consumers) so the offline
and archive pipelines can host their queues on the same connection as the node bus.
"""

from __future__ import annotations

import hashlib
import logging
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.twisted_connection import ClosableDeferredQueue, TwistedProtocolConnection
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.backends.bus import (
    MAX_DELIVERIES,
    PREFETCH,
    call_consumer,
    describe,
    node_queue,
    redelivery_delay,
)
from cim.interfaces import BusConsumer, BusUnavailable, IMessageBus

DEFAULT_HEARTBEAT = 10
"""Seconds, unless the URL says (``?heartbeat=N``). pika checks every heartbeat + 5 s
and drops a connection silent for two checks, so a hung broker or a dead host (no
RST) is left within 30 s and the link reconnects elsewhere or later."""
CONNECT_TIMEOUT = 10.0
"""Seconds for one attempt: TCP, the AMQP handshake, declarations and consumers."""
START_TIMEOUT = 10.0
"""Seconds ``start`` waits for a first usable connection before giving up."""
CLOSE_TIMEOUT = 5.0
"""Seconds a clean close may take before the connection is cut."""
MAX_UNCONFIRMED = 10_000
"""Publishes waiting for the broker's confirm before further ones fail at once."""
FAILURE_MEMORY = 10_000
"""Failed message ids remembered to count redeliveries."""

_log = Logger(namespace="cim.bus.rabbitmq")

_pika_log = logging.getLogger("pika")
if _pika_log.level == logging.NOTSET:
    # pika reports every lost connection and returned message itself (returned bodies
    # included); the link reports state changes once. An operator who configures the
    # "pika" logger gets pika's own lines back.
    _pika_log.setLevel(logging.CRITICAL)


# --- where RabbitMQ is ---------------------------------------------------------------


@dataclass(frozen=True)
class AmqpAddress:
    """A parsed amqp:// or amqps:// URL; its str and repr never show the password."""

    host: str
    port: int
    vhost: str
    tls: bool
    parameters: pika.ConnectionParameters = field(repr=False, compare=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} (vhost {self.vhost!r})"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        # IP literals skip name resolution (which would need the reactor's resolver).
        if isIPAddress(self.host):
            endpoint = TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        elif isIPv6Address(self.host):
            endpoint = TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            # Imported here: it needs pyOpenSSL, which plain amqp:// does not.
            from twisted.internet.ssl import optionsForClientTLS

            # The system's trust store and the URL's host name; pika's ssl_options
            # (a stdlib SSLContext) cannot drive Twisted's TLS.
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint


def parse_amqp_url(url: str, connection_name: str = "cim") -> AmqpAddress:
    """amqp[s]://user:password@host[:port]/vhost[?heartbeat=N&...] (pika's URL syntax)."""
    password = urlsplit(url).password if "://" in url else None
    try:
        if not url.startswith(("amqp://", "amqps://")):
            raise ValueError("expected amqp:// or amqps://")
        parameters = pika.URLParameters(url)
    except (ValueError, SyntaxError) as exc:
        message = str(exc)
        if password:
            message = message.replace(password, "***")
        # The URL holds a password: name the problem, never echo the URL.
        raise ValueError(f"not a usable AMQP URL: {message}") from None
    if "heartbeat=" not in (urlsplit(url).query or ""):
        parameters.heartbeat = DEFAULT_HEARTBEAT
    properties = dict(parameters.client_properties or {})
    properties.setdefault("connection_name", connection_name)
    parameters.client_properties = properties
    return AmqpAddress(
        host=parameters.host,
        port=parameters.port,
        vhost=parameters.virtual_host,
        tls=url.startswith("amqps://"),
        parameters=parameters,
    )


# --- what the link keeps declared ----------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    name: str
    kind: str = "direct"
    durable: bool = True


@dataclass(frozen=True)
class Queue:
    name: str
    durable: bool = True
    arguments: tuple[tuple[str, Any], ...] = ()
    """x-arguments (``x-max-length``, ``x-overflow``...), as pairs to stay hashable."""


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str


Declaration = Exchange | Queue | Binding


# --- one connection ------------------------------------------------------------------


class _Protocol(TwistedProtocolConnection):
    """pika's protocol, telling the link when the connection ends and why it failed."""

    def __init__(self, link: AmqpLink, parameters: pika.ConnectionParameters) -> None:
        super().__init__(parameters, custom_reactor=link.reactor)
        self._link = link
        self.lost = False
        self.cause: str | None = None
        """Why the broker refused or closed the connection, when it said so."""
        self._lost_waiters: list[Deferred[None]] = []
        self._cut_later: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        disconnect = self._impl._adapter_disconnect_stream

        def disconnect_in_bounded_time() -> None:
            # pika ends a connection (after a missed heartbeat, say) with
            # loseConnection, which waits for unsent data to drain: into a hung
            # broker it never does, and the link would stay "connected" to it.
            disconnect()
            if self._cut_later is None and not self.lost:
                self._cut_later = self._link.reactor.callLater(CLOSE_TIMEOUT, self.cut)

        self._impl._adapter_disconnect_stream = disconnect_in_bounded_time

    def when_lost(self) -> Deferred[None]:
        if self.lost:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def cut(self) -> None:
        """Drop the TCP connection at once (a hung broker cannot hold us up)."""
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        _cancel(self._cut_later)
        # The broker's Connection.Close (ACCESS_REFUSED, NOT_ALLOWED for a vhost,
        # CONNECTION_FORCED at shutdown) is kept only until pika overwrites it with the
        # transport's ConnectionDone below, and its handshake failure then reports a
        # bare count of attempts: read it first, for the log and for start().
        error = getattr(self._impl, "_error", None)
        if isinstance(error, pika.exceptions.AMQPError) and self.cause is None:
            self.cause = f"{type(error).__name__}: {error}"
        super().connectionLost(reason)
        self._link._lost(self, self.cause or reason.getErrorMessage())
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)


class _ProtocolFactory(Factory):
    noisy = False

    def __init__(self, link: AmqpLink) -> None:
        self._link = link

    def buildProtocol(self, addr: Any) -> _Protocol:
        protocol = _Protocol(self._link, self._link.address.parameters)
        protocol.factory = self
        return protocol


@dataclass(eq=False)
class _Subscription:
    queue: str
    consumer: BusConsumer
    prefetch: int


@dataclass(eq=False)
class _Session:
    """One usable connection: a confirm-mode channel to publish and one per consumer."""

    protocol: _Protocol
    publisher: Any
    """pika's TwistedChannel in confirm mode."""
    timers: set[IDelayedCall] = field(default_factory=set)
    serial: DeferredLock = field(default_factory=DeferredLock)
    """Declarations and consumers added while connected are set up one at a time, in
    the order they were added, as on a new connection."""


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
    """

    def __init__(
        self,
        reactor: Any,
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
        self._connect_timeout = connect_timeout
        self._initial_delay = reconnect_delay
        self._max_delay = max_reconnect_delay
        self._max_unconfirmed = max_unconfirmed
        self._endpoint = self.address.endpoint(reactor, connect_timeout)
        self._factory = _ProtocolFactory(self)
        self._setup: list[Declaration | _Subscription] = []
        """Applied in this order on every connection: a queue before its binding and
        its consumer."""
        self._session: _Session | None = None
        self._connecting: _Protocol | None = None
        self._attempt: Deferred[Any] | None = None
        self._deadline: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._running = False
        self._reported_up: bool | None = None
        self._waiters: list[Deferred[None]] = []
        self._unconfirmed: dict[str, _Publish] = {}
        self._at_broker = 0
        self._failed_counts: OrderedDict[str, int] = OrderedDict()
        self._gave_up: str | None = None
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        """Whether publishes can reach the broker right now."""
        return self._session is not None

    # --- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> Deferred[None]:
        """Connect; fails with BusUnavailable if no usable connection comes in time.

        Only start-up insists on the broker: once started, the link survives outages.
        """
        self._running = True
        if self._session is not None:
            return defer.succeed(None)
        if self._retry is None and self._attempt is None and self._connecting is None:
            self._connect()
        ready: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(ready)
        ready.addTimeout(timeout, self.reactor)

        def failed(failure: Failure) -> Deferred[None]:
            if failure.check(BusUnavailable):
                return defer.fail(failure)  # stopped meanwhile
            why = self.last_error or "no answer"
            stopped = self.stop()

            def unavailable(_: object) -> None:
                raise BusUnavailable(
                    f"cannot reach RabbitMQ at {self.address} within {timeout:g} s ({why})"
                )

            return stopped.addCallback(unavailable)

        return ready.addErrback(failed)

    def stop(self) -> Deferred[None]:
        """Close the connection (cleanly if the broker answers) and stop reconnecting."""
        self._running = False
        for call in (self._retry, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._deadline = None
        if self._attempt is not None:
            self._attempt.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(BusUnavailable("the bus was stopped"))
        lost: list[Deferred[None]] = []
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            lost.append(connecting.when_lost())
            connecting.cut()
        session, self._session = self._session, None
        if session is not None:
            self._end_session(session)
            protocol = session.protocol
            lost.append(protocol.when_lost())
            if protocol.is_open:
                # Unacknowledged deliveries go back to their queues at once this way.
                protocol.close()
                cut = self.reactor.callLater(CLOSE_TIMEOUT, protocol.cut)
                lost[-1].addCallback(lambda _: _cancel(cut))
            else:
                protocol.cut()
        return defer.gatherResults(lost).addCallback(lambda _: None)

    # --- what to keep declared, and consumers -----------------------------------------

    def declare(self, *declarations: Declaration) -> Deferred[None]:
        """Keep these declared on every connection; applied now if connected.

        The result fails if the broker refuses a declaration now; the link then
        reconnects and keeps trying, reporting the refusal as its reason.
        """
        new = [item for item in declarations if item not in self._setup]
        self._setup.extend(new)
        session = self._session
        if session is None or not new:
            return defer.succeed(None)
        return self._serially(session, lambda: self._apply(session, new))

    def consume(self, queue: str, consumer: BusConsumer, prefetch: int = PREFETCH) -> None:
        """Hand queue's messages to consumer on every connection, acknowledging each
        after consumer's Deferred fires; a failure brings the message back later."""
        subscription = _Subscription(queue, consumer, prefetch)
        self._setup.append(subscription)
        session = self._session
        if session is not None:
            d = self._serially(session, lambda: self._apply(session, [subscription]))
            d.addErrback(lambda _: None)  # _broken logged it; the next connection retries

    def _serially(
        self, session: _Session, step: Callable[[], Coroutine[Any, Any, None]]
    ) -> Deferred[None]:
        def run() -> Deferred[None]:
            if self._session is not session:
                return defer.succeed(None)  # the next connection applies everything
            return Deferred.fromCoroutine(step())

        d: Deferred[None] = session.serial.run(run)
        return d.addErrback(self._broken, session)

    # --- publishing -------------------------------------------------------------------

    def publish(
        self, exchange: str, routing_key: str, body: bytes, *, mandatory: bool = True
    ) -> Deferred[None]:
        """A persistent message; fires on the broker's confirm, else BusUnavailable."""
        session = self._session
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

    # --- consuming --------------------------------------------------------------------

    async def _start_consumer(self, session: _Session, subscription: _Subscription) -> None:
        channel = await session.protocol.channel()
        self._watch(session, channel, f"the channel consuming {subscription.queue!r}")
        await channel.basic_qos(prefetch_count=subscription.prefetch)
        messages, _tag = await channel.basic_consume(subscription.queue, auto_ack=False)
        Deferred.fromCoroutine(self._pump(session, channel, messages, subscription))

    async def _pump(
        self,
        session: _Session,
        channel: Any,
        messages: ClosableDeferredQueue,
        subscription: _Subscription,
    ) -> None:
        while True:
            try:
                message = await messages.get()
            except Exception as exc:
                if self._session is session and isinstance(exc, pika.exceptions.ConsumerCancelled):
                    # The broker cancelled us (the queue was deleted): a new connection
                    # declares the queue again and resumes consuming.
                    self._broken(Failure(exc), session)
                return  # else the channel closed with the connection: a new one follows
            self._deliver(session, channel, subscription, message)

    def _deliver(
        self, session: _Session, channel: Any, subscription: _Subscription, message: Any
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

    # --- the connection loop ----------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        self._gave_up = None
        self._deadline = self.reactor.callLater(self._connect_timeout, self._too_slow)
        attempt: Deferred[Any] = self._endpoint.connect(self._factory)
        self._attempt = attempt
        attempt.addCallbacks(self._tcp_connected, self._tcp_failed)

    def _too_slow(self) -> None:
        self._deadline = None
        why = f"no usable connection within {self._connect_timeout:g} s"
        if self._attempt is not None:
            self._gave_up = why
            self._attempt.cancel()
        elif self._connecting is not None:
            protocol, self._connecting = self._connecting, None
            protocol.cut()
            self._failed(why)

    def _tcp_connected(self, protocol: _Protocol) -> None:
        self._attempt = None
        if not self._running:
            protocol.cut()
            return
        self._connecting = protocol
        opened = Deferred.fromCoroutine(self._open(protocol))
        opened.addCallbacks(self._opened, self._open_failed, errbackArgs=(protocol,))

    def _tcp_failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self._running:
            return
        _cancel(self._deadline)
        self._deadline = None
        self._failed(self._gave_up or describe(failure))

    async def _open(self, protocol: _Protocol) -> _Session:
        await protocol.ready
        publisher = await protocol.channel()
        session = _Session(protocol, publisher)
        self._watch(session, publisher, "the publishing channel")
        publisher.add_on_return_callback(self._returned)
        await publisher.confirm_delivery()
        done = 0
        # By index: what is added while this runs is applied too, before the session
        # counts as usable (nothing can slip in between the last step and _opened).
        while done < len(self._setup):
            await self._apply(session, [self._setup[done]])
            done += 1
        return session

    async def _apply(self, session: _Session, items: Iterable[Declaration | _Subscription]) -> None:
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
            else:
                await channel.queue_bind(
                    queue=item.queue, exchange=item.exchange, routing_key=item.routing_key
                )

    def _opened(self, session: _Session) -> None:
        protocol = session.protocol
        if self._connecting is not protocol:
            protocol.cut()  # the deadline or stop() gave up on it meanwhile
            return
        self._connecting = None
        _cancel(self._deadline)
        self._deadline = None
        if not self._running:
            protocol.cut()
            return
        self._session = session
        self._failures = 0
        self.last_error = None
        self._report(True)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _open_failed(self, failure: Failure, protocol: _Protocol) -> None:
        if self._connecting is not protocol:
            return
        self._connecting = None
        _cancel(self._deadline)
        self._deadline = None
        protocol.cut()
        if self._running:
            self._failed(protocol.cause or describe(failure))

    def _watch(self, session: _Session, channel: Any, what: str) -> None:
        """A channel the broker closes (an error on it) takes the connection down with
        it, so the next connection starts clean with every channel and consumer."""

        def closed(reason: object) -> None:
            if self._session is session and not session.protocol.lost:
                self._broken(Failure(BusUnavailable(f"RabbitMQ closed {what}: {reason}")), session)

        channel.on_closed.addBoth(closed)

    def _broken(self, failure: Failure, session: _Session) -> Failure:
        if self._session is session:
            self.last_error = describe(failure)
            session.protocol.cut()
        return failure

    def _lost(self, protocol: _Protocol, why: str) -> None:
        """The TCP connection ended (called by the protocol)."""
        if self._session is not None and self._session.protocol is protocol:
            session, self._session = self._session, None
            self._end_session(session)
            if self._running:
                # A working connection dropped: try again soon, then back off.
                self._failures = 0
                self._failed(self.last_error or why)
        elif self._connecting is protocol:
            self._connecting = None
            _cancel(self._deadline)
            self._deadline = None
            if self._running:
                self._failed(protocol.cause or why)

    def _end_session(self, session: _Session) -> None:
        for call in session.timers:
            _cancel(call)
        session.timers.clear()

    def _failed(self, why: str) -> None:
        self.last_error = why
        self._report(False)
        self._failures += 1
        delay = min(self._max_delay, self._initial_delay * 2 ** min(self._failures - 1, 30))
        # Jitter keeps a fleet of nodes from reconnecting in lockstep after an outage.
        delay *= random.uniform(0.8, 1.0)
        self._retry = self.reactor.callLater(delay, self._connect)

    def _unreachable(self) -> str:
        if self._reported_up is None and self.last_error is None:
            return f"the {self._name} is not connected to RabbitMQ at {self.address}"
        detail = f" ({self.last_error})" if self.last_error else ""
        return f"RabbitMQ at {self.address} is unreachable{detail}"

    def _report(self, up: bool) -> None:
        if self._reported_up is up:
            return
        first = self._reported_up is None
        self._reported_up = up
        if up:
            _log.info(
                "{name}: connection to RabbitMQ at {where} is {state}",
                name=self._name,
                where=str(self.address),
                state="up" if first else "back",
            )
        elif first:
            _log.warn(
                "{name}: cannot connect to RabbitMQ at {where} ({why}); retrying",
                name=self._name,
                where=str(self.address),
                why=self.last_error,
            )
        else:
            _log.warn(
                "{name}: lost the connection to RabbitMQ at {where} ({why}); publishing "
                "fails until it is back, retrying at most every {cap:g} s",
                name=self._name,
                where=str(self.address),
                why=self.last_error,
                cap=self._max_delay,
            )


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


# --- the node bus --------------------------------------------------------------------


@implementer(IMessageBus)
class RabbitMqBus:
    """Node-to-node delivery through one direct exchange and a durable queue per node."""

    def __init__(
        self,
        reactor: Any,
        amqp_url: str,
        node_id: str,
        exchange: str,
        confirm_timeout: float,
        *,
        start_timeout: float = START_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 5.0,
    ) -> None:
        self._node_id = node_id
        self._exchange = exchange
        self._start_timeout = start_timeout
        self.link = AmqpLink(
            reactor,
            amqp_url,
            confirm_timeout=confirm_timeout,
            name="bus",
            connection_name=f"cim node {node_id}",
            connect_timeout=connect_timeout,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
        )
        self.link.declare(Exchange(exchange), *self._node_declarations(node_id))

    @property
    def connected(self) -> bool:
        return self.link.connected

    def _node_declarations(self, node_id: str) -> list[Declaration]:
        queue = node_queue(node_id)
        return [Queue(queue), Binding(queue, self._exchange, node_id)]

    def start(self) -> Deferred[None]:
        """Connect and declare this node's queue, so others can forward to it at once."""
        return self.link.start(self._start_timeout)

    def stop(self) -> Deferred[None]:
        """Disconnect; this node's queue (durable) keeps what arrives meanwhile."""
        return self.link.stop()

    def publish(self, node_id: str, payload: bytes) -> Deferred[None]:
        return self.link.publish(self._exchange, node_id, payload, mandatory=True)

    def consume(self, node_id: str, consumer: BusConsumer) -> None:
        self.link.declare(*self._node_declarations(node_id)).addErrback(lambda _: None)
        self.link.consume(node_queue(node_id), consumer)
