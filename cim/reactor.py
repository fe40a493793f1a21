"""The one reactor type cim's rooms are given.

Library code never imports ``twisted.internet.reactor``: the reactor (or, where time is
all a room needs, a clock) is passed in, so tests drive it with ``task.Clock`` or
``MemoryReactorClock``. ``ICimReactor`` names, in one place, everything the daemon asks
of the reactor twistd installed, the way Synapse's ``ISynapseReactor`` does; only
``cim.tap`` turns the global reactor into one (``installed_reactor``).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)
from twisted.logger import Logger

if TYPE_CHECKING:
    from cim.metrics import ReactorHolds

_log = Logger()


class ICimReactor(
    IReactorCore,
    IReactorTime,
    IReactorTCP,
    IReactorUNIX,
    IReactorThreads,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
):
    """Core, time, TCP and UNIX sockets, threads and name resolution: what a node uses."""


def installed_reactor() -> ICimReactor:
    """The reactor twistd installed; called at the edge (``cim.tap``), never in a room."""
    from twisted.internet import reactor

    return cast(ICimReactor, reactor)


def dispatch_without_log_context(
    reactor: object,
    holds: ReactorHolds | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> bool:
    """Make an epoll reactor hand each event to its selectable without a log context.

    Twisted's ``EPollReactor.doPoll`` runs every event through ``log.callWithLogger``:
    the selectable's ``logPrefix()`` (a string made per event), a copy of the legacy
    log context with it as "system", and four calls around the real work. That context
    is read only by the legacy ``twisted.python.log`` API; cim logs through
    ``twisted.logger``, whose lines are named by their namespace. On the message path
    (1.7 reads per 1:1 message at 2,000 msg/s) it was 3-7 % of the reactor's CPU per
    message, measured side by side (docs/benchmarks.md). What is lost: a traceback that
    Twisted itself logs through the legacy API from inside an event (an exception out
    of a protocol's ``dataReceived``) says ``[-]`` where it said the connection's
    prefix; it is logged as before, and the connection is closed as before
    (``_doReadOrWrite`` is Twisted's own).

    With ``holds``, the time from each poll's return to the next poll (the turn's
    work, and any wait for the core or the GIL inside it) is told to it when at least
    ``holds.FLOOR``: two ``clock`` calls a turn.

    Only the installed reactor of a daemon is changed (``cim.tap``); any reactor that
    is not an ``EPollReactor`` is left as it is. True when the reactor was changed.
    """
    from twisted.internet.epollreactor import EPollReactor

    if not isinstance(reactor, EPollReactor):
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    floor = holds.FLOOR if holds is not None else 0.0
    returned: float | None = None

    def poll(timeout: float | None) -> None:
        # EPollReactor.doPoll, less the log context around each event.
        nonlocal returned
        if holds is not None and returned is not None:
            held = clock() - returned
            if held >= floor:
                holds.observe(held)
        try:
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                returned = clock()
                return
            raise
        if holds is not None:
            returned = clock()
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except Exception:
                    # As callWithLogger would: logged, and the other events still run.
                    _log.failure("an event for {selectable!r} failed", selectable=selectable)

    # The instance's own, found before the class's by mainLoop (self.doIteration).
    reactor.doPoll = reactor.doIteration = poll  # type: ignore[method-assign]
    return True
