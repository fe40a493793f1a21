"""The connections to Redis a state backend keeps: one for commands, one for notifications.

txredisapi is wrapped rather than used through its connection helpers, whose defaults
bite a server: with no reply timeout a call can wait forever on a hung Redis, and while
disconnected a lazy connection queues calls until Redis is back. Here every command has
a reply timeout, a call made while Redis is unreachable fails at once with
StateUnavailable (the router turns that into a 503), and the two connections (commands
and notifications) are re-established for as long as the backend runs, with a capped
backoff and one log line per change of state rather than per attempt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.state.redis.address import RedisAddress
from cim.backends.state.redis.scripts import Script
from cim.interfaces import StateUnavailable

_log = Logger(namespace="cim.state.redis")


class _CommandProtocol(txredisapi.RedisProtocol):
    pass


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
        reactor: Any,
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


class _Link:
    """One connection to Redis, re-established with a capped backoff until stopped.

    ``protocol`` is the usable connection or None: callers check it and fail fast
    instead of waiting, which is what keeps a Redis outage from piling up requests.
    """

    def __init__(
        self,
        name: str,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        factory: _RedisFactory,
        where: str,
        prepare: Callable[[Any], Deferred[Any]] | None,
        initial_delay: float,
        max_delay: float,
    ) -> None:
        self._name = name
        self._reactor = reactor
        self._endpoint = endpoint
        self._factory = factory
        self._where = where
        self._prepare = prepare
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self.protocol: Any = None
        self._connecting: Any = None
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._running = False
        self._reported_up: bool | None = None
        self._waiters: list[Deferred[None]] = []
        self.last_error: str | None = None

    def start(self) -> None:
        if not self._running:
            self._running = True
            self._connect()

    def when_ready(self) -> Deferred[None]:
        if self.protocol is not None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    def stop(self) -> Deferred[None]:
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        connection = self._connecting or self.protocol
        self.protocol = None
        self._connecting = None
        if connection is None or not connection.connected:
            return defer.succeed(None)
        lost: Deferred[Any] = connection.whenDisconnected()
        connection.transport.loseConnection()
        return lost.addCallback(lambda _: None)

    # --- the loop ---------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        self._factory.last_error = None
        attempt = self._endpoint.connect(self._factory)
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, protocol: Any) -> None:
        self._attempt = None
        if not self._running:
            protocol.transport.loseConnection()
            return
        if not protocol.connected:
            self._failed("connection closed at once")
            return
        self._connecting = protocol
        protocol.whenDisconnected().addCallback(lambda _: self._lost(protocol))
        ready: Deferred[Any] = protocol.whenConnected()  # after AUTH and SELECT
        if self._prepare is not None:
            prepare = self._prepare
            ready.addCallback(lambda _: prepare(protocol))
        ready.addCallbacks(
            lambda _: self._usable(protocol), self._prepare_failed, errbackArgs=(protocol,)
        )

    def _prepare_failed(self, failure: Failure, protocol: Any) -> None:
        self._factory.last_error = failure.getErrorMessage()
        if protocol.connected:
            protocol.transport.abortConnection()

    def _usable(self, protocol: Any) -> None:
        if not self._running or not protocol.connected or self._connecting is not protocol:
            return
        self._connecting = None
        self.protocol = protocol
        self._failures = 0
        self.last_error = None
        self._report(True)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self._running:
            return
        self._failed(failure.getErrorMessage())

    def _lost(self, protocol: Any) -> None:
        was_usable = self.protocol is protocol
        if was_usable:
            self.protocol = None
        if self._connecting is protocol:
            self._connecting = None
        if not self._running:
            return
        if was_usable:
            # A working connection dropped: try again soon, then back off.
            self._failures = 0
            self._failed("connection lost")
        else:
            self._failed(self._factory.last_error or "connection closed before it was ready")

    def _failed(self, why: str) -> None:
        self.last_error = why
        self._report(False)
        self._failures += 1
        delay = min(self._max_delay, self._initial_delay * 2 ** min(self._failures - 1, 30))
        # Jitter keeps a fleet of nodes from reconnecting in lockstep after an outage.
        delay *= random.uniform(0.8, 1.0)
        self._retry = self._reactor.callLater(delay, self._connect)

    def _report(self, up: bool) -> None:
        if self._reported_up is up:
            return
        first = self._reported_up is None
        self._reported_up = up
        if up:
            _log.info(
                "state store: {link} connection to Redis at {where} is {state}",
                link=self._name,
                where=self._where,
                state="up" if first else "back",
            )
        elif first:
            _log.warn(
                "state store: cannot open the {link} connection to Redis at {where} ({why}); "
                "retrying",
                link=self._name,
                where=self._where,
                why=self.last_error,
            )
        else:
            _log.warn(
                "state store: lost the {link} connection to Redis at {where} ({why}); "
                "state calls fail until it is back, retrying at most every {cap} s",
                link=self._name,
                where=self._where,
                why=self.last_error,
                cap=self._max_delay,
            )


class RedisConnection:
    """Commands and session-ended notifications, each on a link of its own.

    ``open`` insists on Redis (a node does not start without its state); once open,
    the links survive outages and calls fail fast with StateUnavailable meanwhile.
    Notifications on ``channel`` go to ``on_message``.
    """

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        reply_timeout: float,
        channel: str,
        on_message: Callable[[str, str], None],
        reconnect_delay: float,
        max_reconnect_delay: float,
    ) -> None:
        self._reactor = reactor
        self._timeout = reply_timeout
        self._channel = channel
        self.where = str(address)
        endpoint = address.endpoint(reactor, reply_timeout)
        self._commands = _Link(
            "command",
            reactor,
            endpoint,
            _RedisFactory(_CommandProtocol, reactor, address, reply_timeout),
            self.where,
            _ping,
            reconnect_delay,
            max_reconnect_delay,
        )
        self._notifications = _Link(
            "notification",
            reactor,
            endpoint,
            _RedisFactory(_SubscriberProtocol, reactor, address, reply_timeout, on_message),
            self.where,
            self._subscribe,
            reconnect_delay,
            max_reconnect_delay,
        )
        self._open = False

    @property
    def connected(self) -> bool:
        """Whether calls can reach Redis right now (both connections are up)."""
        return self._commands.protocol is not None and self._notifications.protocol is not None

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
            d: Deferred[Any] = self._connection().execute_command(*args)
        except (StateUnavailable, txredisapi.ConnectionError) as exc:
            return defer.fail(_unavailable_error(exc))
        return d.addErrback(_unavailable)

    def eval(self, script: Script, *args: str) -> Deferred[Any]:
        """EVALSHA, and EVAL once when Redis does not know the script (NOSCRIPT)."""
        try:
            connection = self._connection()
            d: Deferred[Any] = connection.execute_command("EVALSHA", script.sha, 0, *args)
        except (StateUnavailable, txredisapi.ConnectionError) as exc:
            return defer.fail(_unavailable_error(exc))

        def load(failure: Failure) -> Any:
            if failure.check(txredisapi.ResponseError) and str(failure.value).startswith(
                "NOSCRIPT"
            ):
                return connection.execute_command("EVAL", script.source, 0, *args)
            return failure

        return d.addErrback(load).addErrback(_unavailable)

    def ping_notifications(self) -> None:
        """A silent notification connection could be dead: make it answer or reconnect."""
        protocol = self._notifications.protocol
        if protocol is not None:
            # A ping that times out aborts the connection (txredisapi's reply timeout),
            # which the link then re-establishes.
            protocol.execute_command("PING").addErrback(lambda _: None)

    def _connection(self) -> Any:
        protocol = self._commands.protocol
        if protocol is None:
            why = self._commands.last_error
            detail = f" ({why})" if why else ""
            if not self._open:
                raise StateUnavailable(f"the state store is not connected to {self.where}")
            raise StateUnavailable(f"Redis at {self.where} is unreachable{detail}")
        return protocol

    def _subscribe(self, protocol: Any) -> Deferred[Any]:
        d: Deferred[Any] = protocol.subscribe(self._channel)
        return d.addTimeout(self._timeout, self._reactor)


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
