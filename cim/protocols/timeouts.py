"""Connection deadlines on one shared timer: TimeoutMixin's interface, not its cost.

``twisted.protocols.policies.TimeoutMixin`` gives each connection its own
``DelayedCall``, moved on every frame. For a node holding tens of thousands of idle
connections that is about 0.5 KiB per connection (the call, its bound methods, the
mixin's own ``callLater``), a large share of what an idle connection may cost. Here
each connection keeps only its deadline, a float, and one ``LoopingCall`` per node
sweeps them every ``resolution`` seconds: a connection is closed at most that late,
which is nothing against heartbeat timeouts of tens of seconds.

The protocol side keeps TimeoutMixin's vocabulary (``setTimeout``, ``resetTimeout``,
``timeoutConnection``, and ``setTimeout(None)`` in ``connectionLost``).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

__all__ = ["DeadlineSweeper", "SweptTimeoutMixin"]

NEVER = float("inf")


class SweptTimeoutMixin:
    """Close the connection when ``timeOut`` seconds pass without ``resetTimeout``.

    The class using it sets ``deadlines`` (the node's sweeper) before ``setTimeout``.
    """

    deadlines: DeadlineSweeper
    timeOut: float | None = None
    deadline: float = NEVER

    def setTimeout(self, period: float | None) -> float | None:
        """Start, change or (with None) stop the timeout; returns the previous one."""
        previous = self.timeOut
        self.timeOut = period
        if period is None:
            self.deadline = NEVER
            self.deadlines.forget(self)
        else:
            self.deadline = self.deadlines.clock.seconds() + period
            self.deadlines.watch(self)
        return previous

    def resetTimeout(self) -> None:
        """There was activity: the deadline moves ``timeOut`` seconds from now."""
        if self.timeOut is not None:
            self.deadline = self.deadlines.clock.seconds() + self.timeOut

    def timeoutConnection(self) -> None:
        raise NotImplementedError


class DeadlineSweeper:
    """Checks every watched connection's deadline each ``resolution`` seconds.

    The loop runs only while something is watched, so an idle node with no
    connections schedules nothing.
    """

    def __init__(self, clock: IReactorTime, resolution: float) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.clock = clock
        self.resolution = resolution
        self._watched: set[SweptTimeoutMixin] = set()
        self._loop = LoopingCall(self._sweep)
        self._loop.clock = clock

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, connection: SweptTimeoutMixin) -> None:
        self._watched.add(connection)
        if not self._loop.running:
            self._loop.start(self.resolution, now=False)

    def forget(self, connection: SweptTimeoutMixin) -> None:
        self._watched.discard(connection)
        if not self._watched and self._loop.running:
            self._loop.stop()

    def _sweep(self) -> None:
        now = self.clock.seconds()
        expired = [connection for connection in self._watched if connection.deadline <= now]
        for connection in expired:
            # Forgotten first: the connection may set a new timeout while closing.
            connection.timeOut = None
            connection.deadline = NEVER
            self.forget(connection)
            connection.timeoutConnection()
