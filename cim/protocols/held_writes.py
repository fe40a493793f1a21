"""Frames held while reads are processed, written once per connection when the
outermost read ends (``cim.protocols.wire`` explains why: a read carrying eight msg:R
answers with one send of eight msg:A, not eight).

Work can also wait for that moment (``at_read_end``): the timelines' journal writes the
records a read numbered there, so their answers leave with the read's own frames instead
of one reactor turn later, behind every other read of the turn. And work can wait until
those frames have left (``after_flush``): a 1:1 sender's msg:A is built and sent after
the receiver's live copy is on its way, so the copy never waits for it."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

from twisted.logger import Logger

__all__ = ["HeldWrites", "Later", "no_read"]

_log = Logger()


Later = Callable[[Callable[[], object]], bool]
"""``HeldWrites.at_read_end`` or ``after_flush`` as a room holds it: run the work at
that moment and say True, or say False (no read under way: the caller runs it)."""


def no_read(work: Callable[[], object]) -> bool:
    """A ``Later`` before a listener's ``HeldWrites`` is wired in: never a read."""
    return False


class _Holding(Protocol):
    """A connection with frames held (``cim.protocols.wire.FrameProtocol``)."""

    def flush_held(self) -> None: ...


class HeldWrites:
    """Frames produced while reads are being processed, written when the outermost ends.

    One is shared by every connection of a node (the IM factory's), so a read on one
    connection that produces frames for others (a msg:N to the receiver) also sends
    once per connection. A protocol made without one gets its own.
    """

    __slots__ = ("_after", "_at_end", "connections", "depth")

    def __init__(self) -> None:
        self.depth = 0
        """How many reads are on the stack (a read can cause another)."""
        self.connections: list[_Holding] = []
        """Connections holding frames until the outermost read ends."""
        self._at_end: list[Callable[[], object]] = []
        """Work to run when the outermost read ends, before its frames leave."""
        self._after: list[Callable[[], object]] = []
        """Work to run once those frames have left."""

    def at_read_end(self, work: Callable[[], object]) -> bool:
        """Run ``work`` when the outermost read ends, before the frames held leave (the
        frames ``work`` makes leave with them). False, and nothing kept, when no read
        is under way: the caller picks its own moment."""
        if not self.depth:
            return False
        self._at_end.append(work)
        return True

    def after_flush(self, work: Callable[[], object]) -> bool:
        """Run ``work`` once the frames held now have left, as a read of its own (what
        it sends leaves in one send per connection, in the order the work was given).
        False, and nothing kept, when no read is under way: the caller runs it now."""
        if not self.depth:
            return False
        self._after.append(work)
        return True

    def around(self, work: Callable[[], object]) -> None:
        """Run ``work`` as if it were a read: the frames it makes for a connection
        leave in one send when it ends (or when the read it runs inside ends).

        For work that answers many messages at once outside any read: the timelines'
        answers (msg:A, msg:N and ack:N for a turn's or a batch's messages), which would
        otherwise cost one send per frame.
        """
        self.depth += 1
        try:
            work()
        finally:
            self.depth -= 1
            if not self.depth:
                self.flush()

    def flush(self) -> None:
        # Runs twice for every message a read takes (once for the read, once for the
        # work after it): the end-of-read work runs inline rather than as a call.
        at_end = self._at_end
        if at_end:
            # As a read would: what the work sends is held, then leaves below. A
            # failure is logged, like one in a reactor call, and the frames still leave.
            self.depth += 1
            try:
                while at_end:
                    work = at_end.pop(0)
                    try:
                        work()
                    except Exception:
                        _log.failure("work at the end of a read failed")
            finally:
                self.depth -= 1
        connections = self.connections
        while connections:
            holding = list(connections)
            connections.clear()
            for connection in holding:
                connection.flush_held()
        if self._after:
            # As a read of its own: its frames leave when it ends.
            after, self._after = self._after, []
            self.around(partial(self._run_each, after))

    @staticmethod
    def _run_each(works: list[Callable[[], object]]) -> None:
        for work in works:
            try:
                work()
            except Exception:
                _log.failure("work after a read's frames left failed")
