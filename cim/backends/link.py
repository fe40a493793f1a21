"""One reconnecting link: a connection to a server that cim keeps up until told to stop.

The node's links to Redis and RabbitMQ behave the same way, whatever the protocol on
top, because an operator reads their logs side by side:

- start-up connects, and while running the link reconnects forever with the one
  backoff policy (``cim.backends.backoff``), jittered so a fleet does not come back in
  lockstep;
- a connection counts as up only once it is usable: after TCP, a protocol's own
  ``prepare`` step runs (AUTH/SELECT and a PING for Redis; the AMQP handshake, a
  confirm-mode channel and the declarations for RabbitMQ), within ``attempt_timeout``
  for the whole attempt;
- callers fail fast instead of waiting: ``usable`` is the usable connection or None,
  ``when_ready`` is for start-up only;
- one log line per change of state (up, back, cannot open, lost), never one per
  attempt, and the last reason is kept (``last_error``) for the log and for the
  error a failed start-up raises;
- ``stop`` closes cleanly if the server answers, and cuts the connection after
  ``close_timeout`` if it does not, so a hung server cannot hold a shutdown.

Why not Twisted's ``ClientService``: it logs every retry, it has no transition for a
connection lost during ``prepareConnection`` (automat raises ``NoTransition`` and the
service waits for the prepare step for ever), it puts no deadline on an attempt, and
it neither remembers why the last attempt failed nor reports a lost connection. The
backoff is Twisted's ``backoffPolicy`` all the same (through ``Backoff``).

What differs per protocol is a ``Connections`` object: how to connect, prepare, see
the end of, close and abort one connection, and what to do when one becomes usable
or stops being so. ``TcpConnections`` provides the parts every stream protocol shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff

__all__ = [
    "CLOSE_TIMEOUT",
    "Connections",
    "Link",
    "LinkReport",
    "LinkStopped",
    "TcpConnections",
    "describe",
]

CLOSE_TIMEOUT = 5.0
"""Seconds a clean close may take before the connection is cut."""

P = TypeVar("P")
"""The protocol instance of one connection."""
R = TypeVar("R")
"""What ``prepare`` makes of it: the usable connection callers are given."""


class LinkStopped(Exception):
    """The link was stopped while someone waited for it to be ready."""


def describe(failure: Failure) -> str:
    """A short reason for a log line (some exceptions have an empty message)."""
    return failure.getErrorMessage() or repr(failure.value)


class Connections(Protocol[P, R]):
    """What a link needs to know about its kind of connection."""

    def connect(self) -> Deferred[P]:
        """Open a TCP (or TLS) connection; fires with its protocol."""

    def prepare(self, protocol: P) -> Deferred[R]:
        """Make a fresh connection usable (log in, select, declare, check it answers).

        A failure is the reason the attempt failed: the link aborts the connection
        and retries later.
        """

    def when_lost(self, protocol: P) -> Deferred[str]:
        """Fires with the reason once the connection has ended, also when it has
        ended already; never fails."""

    def close(self, protocol: P) -> None:
        """Begin a clean close (the link cuts it if that takes too long)."""

    def abort(self, protocol: P) -> None:
        """Drop the connection at once; harmless if it has ended already."""

    def up(self, usable: R) -> None:
        """A connection became usable (a connection-made hook)."""

    def down(self, usable: R) -> None:
        """A usable connection ended or is being closed: drop what hangs on it."""


class TcpConnections(Generic[P, R]):
    """The shared parts: connect through an endpoint, close and abort through the
    transport, nothing to do on up and down. Subclasses add ``prepare`` and
    ``when_lost``."""

    def __init__(self, endpoint: IStreamClientEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory

    def connect(self) -> Deferred[P]:
        # endpoint.connect is generic in the protocol, which zope.interface cannot say.
        d: Deferred[P] = self.endpoint.connect(self.factory)  # type: ignore[assignment]
        return d

    def close(self, protocol: P) -> None:
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.loseConnection()

    def abort(self, protocol: P) -> None:
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def up(self, usable: R) -> None:
        pass

    def down(self, usable: R) -> None:
        pass


@dataclass(frozen=True)
class LinkReport:
    """How a link's changes of state read in the log.

    ``connection`` names the link and where it goes ("connection to RabbitMQ at
    h:5672 (vhost '/')", "command connection to Redis at h:6379"); ``while_down``
    says what fails meanwhile ("publishing fails", "state calls fail").
    """

    log: Logger
    name: str
    connection: str
    while_down: str


@dataclass(eq=False)
class _Watched(Generic[P]):
    """One connection the link has seen connect, until it ends."""

    protocol: P
    lost: bool = False
    waiters: list[Deferred[None]] = field(default_factory=list)

    def ended(self) -> Deferred[None]:
        if self.lost:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d

    def mark_lost(self) -> None:
        self.lost = True
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)


class Link(Generic[P, R]):
    """One connection kept up with backoff until stopped; see the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        connections: Connections[P, R],
        backoff: Backoff,
        report: LinkReport,
        *,
        attempt_timeout: float | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._connections = connections
        self.backoff = backoff
        self._report_to = report
        self._attempt_timeout = attempt_timeout
        self._close_timeout = close_timeout
        self._usable: tuple[_Watched[P], R] | None = None
        self._connecting: _Watched[P] | None = None
        self._attempt: Deferred[P] | None = None
        self._deadline: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._gave_up: str | None = None
        self._failures = 0
        self._running = False
        self._reported_up: bool | None = None
        self._waiters: list[Deferred[R]] = []
        self.last_error: str | None = None
        """Why the last attempt failed or the last connection ended; None while up."""

    @property
    def usable(self) -> R | None:
        """The usable connection, or None: callers fail fast rather than wait."""
        return self._usable[1] if self._usable is not None else None

    @property
    def connected(self) -> bool:
        return self._usable is not None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def tried(self) -> bool:
        """Whether an attempt has ended yet, in success or failure."""
        return self._reported_up is not None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Connect, and keep connected until ``stop``; does nothing if running."""
        self._running = True
        if (
            self._usable is None
            and self._retry is None
            and self._attempt is None
            and self._connecting is None
        ):
            self._connect()

    def when_ready(self) -> Deferred[R]:
        """The usable connection, now or once there is one; fails with LinkStopped if
        the link is stopped first. For start-up: afterwards, callers use ``usable``."""
        if self._usable is not None:
            return defer.succeed(self._usable[1])
        d: Deferred[R] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection; fires once it has ended."""
        self._running = False
        for call in (self._retry, self._deadline):
            _cancel(call)
        self._retry = self._deadline = None
        if self._attempt is not None:
            self._attempt.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(LinkStopped("the link was stopped"))
        ended: list[Deferred[None]] = []
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            ended.append(connecting.ended())
            self._connections.abort(connecting.protocol)
        usable, self._usable = self._usable, None
        if usable is not None:
            watched, ready = usable
            self._connections.down(ready)
            ended.append(watched.ended())
            if not watched.lost:
                self._connections.close(watched.protocol)
                cut = self._clock.callLater(
                    self._close_timeout, self._connections.abort, watched.protocol
                )
                ended[-1].addCallback(lambda _: _cancel(cut))
        return defer.gatherResults(ended).addCallback(lambda _: None)

    def drop(self, why: str) -> None:
        """The usable connection is broken (a reply timed out, the server closed a
        channel): cut it and reconnect, reporting ``why`` as the reason."""
        if self._usable is not None:
            self.last_error = why
            self._connections.abort(self._usable[0].protocol)

    # --- the loop ---------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        self._gave_up = None
        if self._attempt_timeout is not None:
            self._deadline = self._clock.callLater(self._attempt_timeout, self._too_slow)
        attempt = self._connections.connect()
        self._attempt = attempt
        attempt.addCallbacks(self._tcp_connected, self._tcp_failed)

    def _too_slow(self) -> None:
        self._deadline = None
        why = f"no usable connection within {self._attempt_timeout:g} s"
        if self._attempt is not None:
            self._gave_up = why
            self._attempt.cancel()
        elif self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            self._connections.abort(connecting.protocol)
            self._failed(why)

    def _tcp_failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self._running:
            return
        self._stop_deadline()
        self._failed(self._gave_up or describe(failure))

    def _tcp_connected(self, protocol: P) -> None:
        self._attempt = None
        if not self._running:
            self._connections.abort(protocol)
            return
        watched = _Watched(protocol)
        self._connecting = watched
        self._connections.when_lost(protocol).addCallback(self._lost, watched)
        if self._connecting is not watched:
            return  # it ended at once, and _lost dealt with it
        prepared = self._connections.prepare(protocol)
        prepared.addCallbacks(
            self._prepared,
            self._prepare_failed,
            callbackArgs=(watched,),
            errbackArgs=(watched,),
        )

    def _prepared(self, ready: R, watched: _Watched[P]) -> None:
        if self._connecting is not watched:
            # The deadline or stop() gave up on it meanwhile (or it ended).
            self._connections.abort(watched.protocol)
            return
        self._connecting = None
        self._stop_deadline()
        self._usable = (watched, ready)
        self._failures = 0
        self.last_error = None
        self._report(True)
        self._connections.up(ready)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(ready)

    def _prepare_failed(self, failure: Failure, watched: _Watched[P]) -> None:
        if self._connecting is not watched:
            return
        self._connecting = None
        self._stop_deadline()
        self._connections.abort(watched.protocol)
        if self._running:
            self._failed(describe(failure))

    def _lost(self, why: str, watched: _Watched[P]) -> None:
        watched.mark_lost()
        if self._usable is not None and self._usable[0] is watched:
            ready = self._usable[1]
            self._usable = None
            self._connections.down(ready)
            if self._running:
                # A working connection dropped: try again soon, then back off.
                self._failures = 0
                self._failed(self.last_error or why)
        elif self._connecting is watched:
            self._connecting = None
            self._stop_deadline()
            if self._running:
                self._failed(why)

    def _failed(self, why: str) -> None:
        self.last_error = why
        self._report(False)
        self._failures += 1
        self._retry = self._clock.callLater(self.backoff.after(self._failures), self._connect)

    def _stop_deadline(self) -> None:
        _cancel(self._deadline)
        self._deadline = None

    def _report(self, up: bool) -> None:
        if self._reported_up is up:
            return
        first = self._reported_up is None
        self._reported_up = up
        report = self._report_to
        if up:
            report.log.info(
                "{name}: {connection} is {state}",
                name=report.name,
                connection=report.connection,
                state="up" if first else "back",
            )
        elif first:
            report.log.warn(
                "{name}: cannot open the {connection} ({why}); retrying",
                name=report.name,
                connection=report.connection,
                why=self.last_error,
            )
        else:
            report.log.warn(
                "{name}: lost the {connection} ({why}); {while_down} until it is back, "
                "retrying at most every {cap:g} s",
                name=report.name,
                connection=report.connection,
                why=self.last_error,
                while_down=report.while_down,
                cap=self.backoff.maximum,
            )


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()
