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

The same sweep frees what a quiet connection can rebuild: a connection that used its
cipher contexts (``ChaChaSealer``/``ChaChaOpener`` hold about 2.3 KiB of OpenSSL state
each once used) says so with ``used``, and the next sweep calls its ``release_idle``.
So an idle connection holds them at most ``resolution`` seconds after its last frame,
however long its heartbeat interval, and a busy one rebuilds them once per sweep (a
microsecond), not once per frame.
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
        self.active_until(self.deadlines.clock.seconds())

    def active_until(self, now: float) -> None:
        """``resetTimeout`` with the clock read already (a read's frames read it once)."""
        if self.timeOut is not None:
            self.deadline = now + self.timeOut

    def timeoutConnection(self) -> None:
        raise NotImplementedError

    def release_idle(self) -> None:
        """Free what the next frame can rebuild (called by the sweep after ``used``)."""


class DeadlineSweeper:
    """Checks every watched connection's deadline each ``resolution`` seconds, and
    releases what the connections that said ``used`` since the last sweep can rebuild.

    The loop runs only while something is watched or used, so an idle node with no
    connections schedules nothing.
    """

    def __init__(self, clock: IReactorTime, resolution: float) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.clock = clock
        self.resolution = resolution
        self._watched: set[SweptTimeoutMixin] = set()
        self._used: set[SweptTimeoutMixin] = set()
        self._loop = LoopingCall(self._sweep)
        self._loop.clock = clock

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, connection: SweptTimeoutMixin) -> None:
        self._watched.add(connection)
        self._run()

    def forget(self, connection: SweptTimeoutMixin) -> None:
        """Stop watching the deadline (a release already due still happens)."""
        self._watched.discard(connection)
        self._stop_if_idle()

    def used(self, connection: SweptTimeoutMixin) -> None:
        """The connection holds something to free if it stays quiet: the next sweep
        calls its ``release_idle``."""
        self._used.add(connection)
        self._run()

    def gone(self, connection: SweptTimeoutMixin) -> None:
        """The connection closed: no release is due, and its deadline is forgotten."""
        self._used.discard(connection)
        self.forget(connection)

    def _run(self) -> None:
        if not self._loop.running:
            self._loop.start(self.resolution, now=False)

    def _stop_if_idle(self) -> None:
        if not self._watched and not self._used and self._loop.running:
            self._loop.stop()

    def _sweep(self) -> None:
        used = self._used
        if used:
            self._used = set()
            for connection in used:
                connection.release_idle()
        now = self.clock.seconds()
        expired = [connection for connection in self._watched if connection.deadline <= now]
        for connection in expired:
            # Forgotten first: the connection may set a new timeout while closing.
            connection.timeOut = None
            connection.deadline = NEVER
            self._watched.discard(connection)
            connection.timeoutConnection()
        self._stop_if_idle()
