"""The connections to Redis a state backend keeps: one for commands, one for notifications.

txredisapi is wrapped rather than used through its connection helpers, whose defaults
bite a server: with no reply timeout a call can wait forever on a hung Redis, and while
disconnected a lazy connection queues calls until Redis is back. Here every command has
a reply timeout, a call made while Redis is unreachable fails at once with
StateUnavailable (the router turns that into a 503), and the two connections (commands
and notifications) are re-established for as long as the backend runs. Reconnecting,
backing off and logging once per change of state is cim.backends.link's job; this module
only tells it what a usable Redis connection is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.backends.link import Link, LinkReport, TcpConnections
from cim.backends.state.redis.address import RedisAddress
from cim.backends.state.redis.scripts import Script
from cim.interfaces import StateUnavailable
from cim.reactor import ICimReactor

_log = Logger(namespace="cim.state.redis")

LAST_CHANCE = 0.01
"""Seconds past a reply's deadline before it counts as lost: the reactor polls its
sockets in between, so a reply that came while the node was behind is read first."""


class _CommandProtocol(txredisapi.RedisProtocol):
    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        """The command in Redis's protocol, as txredisapi's own makes it, faster.

        txredisapi encodes each argument through a chain of ``isinstance`` checks and
        writes the lengths through the same, into a bytearray: about 40 % of the
        node's CPU per message stored for an offline user on Redis was making the
        route lookup's and the receipt's commands (``docs/benchmarks.md``). Strings,
        bytes and ints, which is every argument cim sends, take the short way; any
        other value goes through txredisapi's encoder, unchanged.
        """
        charset, errors = self.charset, self.errors
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            kind = type(arg)
            if kind is str and charset is not None:
                value = arg.encode(charset, errors)
            elif kind is bytes:
                value = arg
            elif kind is int:
                value = b"%d" % arg
            else:
                value = self._encode_value(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
        return b"".join(parts)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.on_message(channel, message)


class _RedisFactory(Factory):
    """Builds txredisapi protocols bound to our reactor, credentials and timeout.

    txredisapi's protocols schedule their reply timeouts on the global reactor and
    call back into their factory when AUTH or SELECT is refused; this factory gives
    them the injected reactor and turns that call-back into a remembered error (the
    link keeps retrying: an operator may fix the password without restarting us).
    """

    noisy = False
    isLazy = False

    def __init__(
        self,
        protocol_class: type,
        reactor: ICimReactor,
        address: RedisAddress,
        reply_timeout: float,
        on_message: Callable[[str, str], None] | None = None,
    ) -> None:
        self._protocol_class = protocol_class
        self._reactor = reactor
        self._address = address
        self._reply_timeout = reply_timeout
        self.on_message = on_message or (lambda channel, message: None)
        self.last_error: str | None = None

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self._protocol_class(
            charset="utf-8",
            replyTimeout=self._reply_timeout,
            password=self._address.password,
            dbid=self._address.db or None,
            convertNumbers=False,
            username=self._address.username,
        )
        protocol.factory = self
        protocol.callLater = self._reactor.callLater
        return protocol

    def stopTrying(self) -> None:
        """txredisapi gives up after a refused AUTH/SELECT; we back off and retry."""

    def connectionError(self, why: str) -> None:
        self.last_error = why


class _RedisConnections(TcpConnections[Any, Any]):
    """What the one reconnecting link (cim.backends.link) needs to know about Redis.

    A connection is usable once txredisapi has done AUTH and SELECT and ``check``
    has had its answer (a PING for commands, the SUBSCRIBE for notifications); the
    usable connection is the txredisapi protocol itself.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        factory: _RedisFactory,
        check: Callable[[Any], Deferred[Any]],
    ) -> None:
        super().__init__(endpoint, factory)
        self._redis = factory
        self._check = check
        self._usable: Any = None

    def connect(self) -> Deferred[Any]:
        self._redis.last_error = None
        return super().connect()

    def prepare(self, protocol: Any) -> Deferred[Any]:
        ready: Deferred[Any] = protocol.whenConnected()  # after AUTH and SELECT
        check = self._check
        ready.addCallback(lambda _: check(protocol))
        return ready.addCallback(lambda _: protocol)

    def when_lost(self, protocol: Any) -> Deferred[str]:
        if not protocol.connected:
            return defer.succeed("connection closed at once")
        lost: Deferred[Any] = protocol.whenDisconnected()
        return lost.addCallback(lambda _: self._why_lost(protocol))

    def _why_lost(self, protocol: Any) -> str:
        if protocol is self._usable:
            return "connection lost"
        # A refused AUTH or SELECT closes the connection; txredisapi says why here.
        return self._redis.last_error or "connection closed before it was ready"

    def up(self, usable: Any) -> None:
        self._usable = usable

    def down(self, usable: Any) -> None:
        if self._usable is usable:
            self._usable = None


def _link(
    name: str,
    reactor: ICimReactor,
    endpoint: IStreamClientEndpoint,
    factory: _RedisFactory,
    where: str,
    check: Callable[[Any], Deferred[Any]],
    backoff: Backoff,
) -> Link[Any, Any]:
    """One of the two connections, kept up by the one reconnecting link."""
    report = LinkReport(
        _log, "state store", f"{name} connection to Redis at {where}", "state calls fail"
    )
    return Link(reactor, _RedisConnections(endpoint, factory, check), backoff, report)


class RedisConnection:
    """Commands and notifications, each on a link of its own.

    ``open`` insists on Redis (a node does not start without its state); once open,
    the links survive outages and calls fail fast with StateUnavailable meanwhile.
    Notifications on ``channels`` go to ``on_message``; ``on_subscribed`` is called
    each time the notification connection is subscribed again (what was published
    while it was down is lost).
    """

    def __init__(
        self,
        reactor: ICimReactor,
        address: RedisAddress,
        reply_timeout: float,
        channels: list[str],
        on_message: Callable[[str, str], None],
        reconnect_delay: float,
        max_reconnect_delay: float,
        on_subscribed: Callable[[], None] = lambda: None,
    ) -> None:
        self._reactor = reactor
        self._timeout = reply_timeout
        self._channels = channels
        self._on_subscribed = on_subscribed
        self.where = str(address)
        endpoint = address.endpoint(reactor, reply_timeout)
        # Jitter keeps a fleet of nodes from reconnecting in lockstep after an outage.
        backoff = Backoff(reconnect_delay, max_reconnect_delay, jitter=0.2)
        self._commands = _link(
            "command",
            reactor,
            endpoint,
            _RedisFactory(_CommandProtocol, reactor, address, reply_timeout),
            self.where,
            _ping,
            backoff,
        )
        self._notifications = _link(
            "notification",
            reactor,
            endpoint,
            _RedisFactory(_SubscriberProtocol, reactor, address, reply_timeout, on_message),
            self.where,
            self._subscribe,
            backoff,
        )
        self._open = False

    @property
    def connected(self) -> bool:
        """Whether calls can reach Redis right now (both connections are up)."""
        return self._commands.connected and self._notifications.connected

    @property
    def notified(self) -> bool:
        """Whether notifications reach this node right now."""
        return self._notifications.usable is not None

    def open(self) -> Deferred[None]:
        """Connect; fails with StateUnavailable if Redis is not reached in time."""
        self._open = True
        self._commands.start()
        self._notifications.start()
        ready = defer.gatherResults(
            [self._commands.when_ready(), self._notifications.when_ready()],
            consumeErrors=True,
        )
        ready.addTimeout(self._timeout, self._reactor)

        def failed(failure: Failure) -> Deferred[None]:
            why = self._commands.last_error or self._notifications.last_error or "no answer"
            closed = self.close()

            def unavailable(_: object) -> None:
                raise StateUnavailable(
                    f"cannot reach Redis at {self.where} within {self._timeout:g} s ({why})"
                )

            return closed.addCallback(unavailable)

        return ready.addCallbacks(lambda _: None, failed)

    def close(self) -> Deferred[None]:
        self._open = False
        d = defer.gatherResults(
            [self._commands.stop(), self._notifications.stop()], consumeErrors=True
        )
        return d.addCallback(lambda _: None)

    def command(self, *args: str) -> Deferred[Any]:
        try:
            protocol = self._connection()
            d = self._timed(protocol, protocol.execute_command(*args, apply_timeout=False))
        except (StateUnavailable, txredisapi.ConnectionError) as exc:
            return defer.fail(_unavailable_error(exc))
        return d.addErrback(_unavailable)

    def eval(self, script: Script, *args: str) -> Deferred[Any]:
        """EVALSHA, and EVAL once when Redis does not know the script (NOSCRIPT)."""
        try:
            protocol = self._connection()
            d = self._timed(
                protocol,
                protocol.execute_command("EVALSHA", script.sha, 0, *args, apply_timeout=False),
            )
        except (StateUnavailable, txredisapi.ConnectionError) as exc:
            return defer.fail(_unavailable_error(exc))

        def load(failure: Failure) -> Any:
            if failure.check(txredisapi.ResponseError) and str(failure.value).startswith(
                "NOSCRIPT"
            ):
                return self._timed(
                    protocol,
                    protocol.execute_command("EVAL", script.source, 0, *args, apply_timeout=False),
                )
            return failure

        return d.addErrback(load).addErrback(_unavailable)

    def _timed(self, protocol: Any, reply: Deferred[Any]) -> Deferred[Any]:
        """The reply timeout, for a node that may be behind itself.

        txredisapi's own timer aborts the connection the moment it fires. A node
        that fell behind (one turn that took seconds: a burst of frames, a starved
        core) runs its due timers before it reads the sockets, so the reply sitting
        unread in the Redis socket counted as lost and every call in flight failed
        with it: under load, a burst of refusals for a Redis that had answered. Here
        a timer that fires gives the reactor one more pass over its sockets (a timer
        set while the timers run fires after the next poll at the earliest) and only
        then gives up.
        """
        answer: Deferred[Any] = Deferred()
        timers: list[IDelayedCall] = []

        def expire(last_chance: bool) -> None:
            if answer.called:
                return
            if not last_chance:
                timers.append(self._reactor.callLater(LAST_CHANCE, expire, True))
                return
            why = f"Not received Redis response in {self._timeout:g} seconds"
            answer.errback(txredisapi.TimeoutError(why))
            if protocol.transport is not None:
                protocol.transport.abortConnection()

        timers.append(self._reactor.callLater(self._timeout, expire, False))

        def settled(result: Any) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            if answer.called:
                return  # given up on already; the connection is being closed
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        reply.addBoth(settled)
        return answer

    def ping_notifications(self) -> None:
        """A silent notification connection could be dead: make it answer or reconnect."""
        protocol = self._notifications.usable
        if protocol is not None:
            # A ping that times out aborts the connection (txredisapi's reply timeout),
            # which the link then re-establishes.
            protocol.execute_command("PING").addErrback(lambda _: None)

    def _connection(self) -> Any:
        protocol = self._commands.usable
        if protocol is None:
            why = self._commands.last_error
            detail = f" ({why})" if why else ""
            if not self._open:
                raise StateUnavailable(f"the state store is not connected to {self.where}")
            raise StateUnavailable(f"Redis at {self.where} is unreachable{detail}")
        return protocol

    def _subscribe(self, protocol: Any) -> Deferred[Any]:
        d: Deferred[Any] = protocol.subscribe(self._channels)
        d.addTimeout(self._timeout, self._reactor)

        def subscribed(result: Any) -> Any:
            self._on_subscribed()
            return result

        return d.addCallback(subscribed)


def _ping(protocol: Any) -> Deferred[Any]:
    """A connection counts as up once Redis answers on it, not when TCP connects.

    The kernel accepts connections for a hung (or stopped) Redis; without this check
    such a connection would look usable until its first call timed out, and the link
    would flap between up and down instead of backing off.
    """
    d: Deferred[Any] = protocol.execute_command("PING")
    return d


def _unavailable_error(exc: BaseException) -> StateUnavailable:
    if isinstance(exc, StateUnavailable):
        return exc
    if isinstance(exc, txredisapi.TimeoutError):
        return StateUnavailable(f"Redis did not answer in time: {exc}")
    if isinstance(exc, txredisapi.ConnectionError):
        return StateUnavailable(f"the connection to Redis failed: {exc}")
    return StateUnavailable(f"Redis refused the call: {exc}")


def _unavailable(failure: Failure) -> Failure:
    """Whatever went wrong talking to Redis, callers see one exception type."""
    if failure.check(txredisapi.RedisError) and failure.value is not None:
        return Failure(_unavailable_error(failure.value))
    return failure
