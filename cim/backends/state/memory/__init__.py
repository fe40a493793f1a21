"""The embedded state backend: everything in this process, for a single node.

One module per facet (sessions, routes, receipts, sequences); sessions and routes share
one SessionTable (table.py), because a session's online entry lives and dies with it.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from cim.backends.state.memory.receipts import MemoryReceiptStore
from cim.backends.state.memory.routes import MemoryRouteStore
from cim.backends.state.memory.sequences import MemorySequenceStore
from cim.backends.state.memory.sessions import MemorySessionStore
from cim.backends.state.memory.table import SessionTable
from cim.interfaces import IStateBackend


@implementer(IStateBackend)
class MemoryState:
    """The four memory facets and the prune that gives back memory nobody will ask for.

    Correctness never waits for the prune (expiry is enforced on every lookup, and a
    receipt past its window is replaced when asked); the periodic prune (``start`` /
    ``stop``) only frees sessions and receipts nobody looks up again.
    """

    def __init__(
        self, clock: IReactorTime, prune_interval: float = 60.0, dedup_window: float = 600.0
    ) -> None:
        self.table = SessionTable(clock)
        self.sessions = MemorySessionStore(self.table)
        self.presence = MemoryRouteStore(self.table)
        self.receipts = MemoryReceiptStore(clock, dedup_window)
        self.sequences = MemorySequenceStore()
        self._prune_interval = prune_interval
        self._pruner = LoopingCall(self.prune_expired)
        self._pruner.clock = clock

    def start(self) -> Deferred[None]:
        if not self._pruner.running:
            self._pruner.start(self._prune_interval, now=False)
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        if self._pruner.running:
            self._pruner.stop()
        return defer.succeed(None)

    def prune_expired(self) -> int:
        """Forget receipts past their window and end every session past its expiry;
        returns how many sessions ended."""
        self.receipts.forget_expired()
        return self.table.end_expired()
