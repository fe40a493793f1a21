"""Frames held while reads are processed, written once per connection when the
outermost read ends (``cim.protocols.wire`` explains why: a read carrying eight msg:R
answers with one send of eight msg:A, not eight)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["HeldWrites"]


class _Holding(Protocol):
    """A connection with frames held (``cim.protocols.wire.FrameProtocol``)."""

    def flush_held(self) -> None: ...


class HeldWrites:
    """Frames produced while reads are being processed, written when the outermost ends.

    One is shared by every connection of a node (the IM factory's), so a read on one
    connection that produces frames for others (a msg:N to the receiver) also sends
    once per connection. A protocol made without one gets its own.
    """

    __slots__ = ("connections", "depth")

    def __init__(self) -> None:
        self.depth = 0
        """How many reads are on the stack (a read can cause another)."""
        self.connections: list[_Holding] = []
        """Connections holding frames until the outermost read ends."""

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
        connections = self.connections
        while connections:
            holding = list(connections)
            connections.clear()
            for connection in holding:
                connection.flush_held()
