"""The one reactor type cim's rooms are given.

Library code never imports ``twisted.internet.reactor``: the reactor (or, where time is
all a room needs, a clock) is passed in, so tests drive it with ``task.Clock`` or
``MemoryReactorClock``. ``ICimReactor`` names, in one place, everything the daemon asks
of the reactor twistd installed, the way Synapse's ``ISynapseReactor`` does; only
``cim.tap`` turns the global reactor into one (``installed_reactor``).
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)


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
