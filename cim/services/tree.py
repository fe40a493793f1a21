"""The parts of cim's service tree: children that start one after another, stop in reverse.

Twisted's ``MultiService`` starts its children synchronously and stops them all at
once. A node's start-up is asynchronous (the database migrates, backends connect,
ports bind) and ordered (the bus starts only once its consumer is registered, the IM
port opens only once everything behind it is up), and its stop is the reverse with
each step finished before the next (clients are told and drained before the bus and
the database go). So the tree is made of:

- ``OrderedServices``, a ``MultiService`` whose children start in the order they were
  added, each once the one before is ready, and stop in reverse, one at a time. It is
  ready when its last child is; the first child that fails to start ends the start-up.
- ``AsyncService``, a child whose ``start`` and ``stop`` may be asynchronous, and
  ``Step``, one made of a room's own start and stop callables.
- ``Listener``, one listening port: Twisted's ``StreamServerEndpointService``, which
  also says when it listens or why it cannot.

Every child explains its own start-up failure in the operator's terms, as a
``StartupError`` whose message is ``[section] key = 'value': why``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.interfaces import BusUnavailable, NodeIdTaken, StateUnavailable
from cim.reactor import ICimReactor

__all__ = [
    "AsyncService",
    "Explain",
    "Listener",
    "OrderedChild",
    "OrderedServices",
    "StartupError",
    "Step",
    "backend_failure",
    "cannot_listen",
    "cannot_start",
]


class StartupError(Exception):
    """A start-up step failed; the message is what the operator needs to read."""


Explain = Callable[[Exception], str | None]
"""Turns a start-up failure into ``[section] key = 'value': why``, or None if it cannot."""


def unexplained(exc: Exception) -> str | None:
    return None


class OrderedChild(Protocol):
    """What an ``OrderedServices`` asks of a child: a service that says when it is ready."""

    name: str | None
    running: int

    def setServiceParent(self, parent: Any) -> None: ...

    def startService(self) -> None: ...

    def stopService(self) -> Deferred[None] | None: ...

    def when_ready(self) -> Deferred[None]:
        """After ``startService``: fires once started, fails with why it could not.

        Asked for once, by the parent that started it.
        """
        ...


ChildT = TypeVar("ChildT", bound=OrderedChild)


class OrderedServices(MultiService):
    """Children start in the order they were added, each once the previous is ready.

    They stop in reverse, each once the next has finished stopping. Only children that
    finished starting are stopped: one whose start failed or was cut short by the stop
    cleans up after itself, as a start that fails must anyway. A nested tree is the
    exception, since it stops only its own children that started: one whose start
    failed half-way is stopped too. Nothing starts in
    ``privilegedStartService``: every child starts in order in ``startService``.
    """

    log = Logger()

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name
        self._starting: Deferred[None] | None = None
        self._running_children: list[OrderedChild] = []
        self.stopping_child = ""
        """The child being stopped now, for the log when a stop takes too long."""

    def add(self, child: ChildT) -> ChildT:
        """``child`` starts after every child added before it, and stops before them."""
        if self.running:
            raise RuntimeError("children are added before the tree starts")
        child.setServiceParent(self)
        return child

    def children(self) -> Iterator[OrderedChild]:
        return cast(Iterator[OrderedChild], iter(self))

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        self._starting = Deferred.fromCoroutine(self._start_in_order())

    async def _start_in_order(self) -> None:
        for child in self.children():
            child.startService()
            if isinstance(child, OrderedServices):
                # A tree stops only those of its children that started, so it is
                # stopped even when its own start failed half-way: its port closes
                # and its pool drains, where a Step must clean up after itself.
                self._running_children.append(child)
                await child.when_ready()
            else:
                await child.when_ready()
                self._running_children.append(child)

    def when_ready(self) -> Deferred[None]:
        if self._starting is None:
            raise RuntimeError("when_ready before startService")
        return self._starting

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_reverse())

    async def _stop_in_reverse(self) -> None:
        starting = self._starting
        if starting is not None and not starting.called:
            starting.cancel()
        while self._running_children:
            child = self._running_children.pop()
            self.stopping_child = child.name or ""
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("error while stopping {child}", child=child.name)
        self.stopping_child = ""


class AsyncService(Service):
    """A child whose ``start`` and ``stop`` may return a Deferred or be coroutines.

    ``explain`` names a start-up failure for the operator; a failure it cannot explain
    is passed on as it is (and reported with its type and traceback).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._ready: Deferred[None] | None = None

    def start(self) -> object:
        return None

    def stop(self) -> object:
        return None

    def explain(self, exc: Exception) -> str | None:
        return None

    def startService(self) -> None:
        super().startService()
        self._ready = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            await maybeDeferred(self.start)
        except CancelledError:
            raise
        except Exception as exc:
            why = self.explain(exc)
            if why is None:
                raise
            raise StartupError(why) from None

    def when_ready(self) -> Deferred[None]:
        if self._ready is None:
            raise RuntimeError("when_ready before startService")
        return self._ready

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await maybeDeferred(self.stop)


class Step(AsyncService):
    """A room's lifetime given as its own start and stop (sync, Deferred or async)."""

    def __init__(
        self,
        name: str,
        start: Callable[[], object],
        stop: Callable[[], object] | None = None,
        explain: Explain = unexplained,
    ) -> None:
        super().__init__(name)
        self._start_room = start
        self._stop_room = stop
        self._explain = explain

    def start(self) -> object:
        return self._start_room()

    def stop(self) -> object:
        return None if self._stop_room is None else self._stop_room()

    def explain(self, exc: Exception) -> str | None:
        return self._explain(exc)


def backend_failure(section: str, backend: str, exc: Exception) -> str:
    """``[section] backend = '...': why`` for a backend that would not start."""
    if isinstance(exc, StateUnavailable | NodeIdTaken | BusUnavailable):
        return f"[{section}] backend = {backend!r}: {exc}"
    return f"[{section}] backend = {backend!r}: cannot start: {exc}"


def cannot_start(section: str, backend: str) -> Explain:
    """``backend_failure`` as a step's ``explain``."""

    def explain(exc: Exception) -> str:
        return backend_failure(section, backend, exc)

    return explain


def cannot_listen(section: str, description: str) -> Explain:
    """``[section] listen = '...': cannot listen: why`` for a port that cannot be bound."""

    def explain(exc: Exception) -> str | None:
        if not isinstance(exc, CannotListenError):
            return None
        why = exc.socketError.strerror if exc.socketError is not None else str(exc)
        return f"[{section}] listen = {description!r}: cannot listen: {why}"

    return explain


@implementer(IStreamServerEndpoint)
class _ReportedEndpoint:
    """Listens through ``endpoint`` and keeps the outcome for the tree.

    ``StreamServerEndpointService`` only logs a port it could not open; the tree must
    stop the start-up with the reason instead, so the outcome goes to ``outcome`` and
    the service sees no port (None), which it knows how to stop.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, connections: type[tcp.Server] | None = None
    ) -> None:
        self._endpoint = endpoint
        self._connections = connections
        self.port: IListeningPort | None = None
        self.outcome: Deferred[IListeningPort] = Deferred()

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        """Fires with the port, or with None (the outcome has the failure)."""

        def listening(port: IListeningPort) -> IListeningPort:
            if self._connections is not None and isinstance(port, tcp.Port):
                # Set before the reactor first accepts on it (listenTCP is synchronous).
                port.transport = self._connections
            self.port = port
            self.outcome.callback(port)
            return port

        def failed(failure: Failure) -> None:
            self.outcome.errback(failure)

        listened: Deferred[IListeningPort] = self._endpoint.listen(factory)
        return listened.addCallbacks(listening, failed)


class Listener(StreamServerEndpointService):
    """One listening port of the node, as Twisted's service for it.

    ``description`` is the config's endpoint string (``tcp:5222:interface=...``);
    ``when_ready`` fires once the port listens, or fails with
    ``[section] listen = '...': cannot listen: why``. ``connections``, on a plain TCP
    port, is the class its connections are made of (the IM port's
    ``cim.protocols.compact.CompactServer``).
    """

    log = Logger()

    def __init__(
        self,
        section: str,
        description: str,
        reactor: ICimReactor,
        factory: IProtocolFactory,
        connections: type[tcp.Server] | None = None,
    ) -> None:
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise StartupError(f"[{section}] listen = {description!r}: {exc}") from None
        self._reported = _ReportedEndpoint(endpoint, connections)
        super().__init__(self._reported, factory)
        self.name = f"{section} listener"
        self.section = section
        self.description = description
        self._explain = cannot_listen(section, description)

    @property
    def port(self) -> IListeningPort | None:
        """The listening port once ``when_ready`` has fired."""
        return self._reported.port

    def when_ready(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._listening())

    async def _listening(self) -> None:
        try:
            await self._reported.outcome
        except CancelledError:
            raise
        except Exception as exc:
            why = self._explain(exc)
            if why is None:
                raise
            raise StartupError(why) from None
        self.log.info(
            "{section} listening on {listen}", section=self.section, listen=self.description
        )
