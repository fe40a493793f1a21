"""Server message ids: 64-bit, time-ordered, unique across nodes.

Layout (most significant first): 41 bits of milliseconds since 2024-01-01 UTC, 10
bits of node number, 12 bits of per-millisecond sequence. Sorting ids sorts messages
by the time the node took them, which is what group ordering needs (design: 群聊以
服务器收到的顺序为准), and a node never repeats or goes back even when the wall
clock steps backwards: it keeps counting from the last millisecond it used. The node
number comes from the state store (``ISequenceStore.node_number``), which never hands the
same number to two node ids.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
NODE_BITS = 10
SEQUENCE_BITS = 12
MAX_NODE_NUMBER = (1 << NODE_BITS) - 1
_MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1


class MessageIdGenerator:
    """Ids for one node. The daemon makes it before start-up and ``claim``s the node
    number the state store hands out during start-up, before anything takes a message."""

    def __init__(self, clock: IReactorTime, node_number: int) -> None:
        self._clock = clock
        self._node_bits = 0
        self._last_ms = 0
        self._sequence = 0
        self.claim(node_number)

    def claim(self, node_number: int) -> None:
        """Put ``node_number`` into every id from now on."""
        if not 0 <= node_number <= MAX_NODE_NUMBER:
            raise ValueError(f"node number must be 0..{MAX_NODE_NUMBER}")
        self._node_bits = node_number << SEQUENCE_BITS

    def next_id(self) -> int:
        now_ms = int(self._clock.seconds() * 1000) - EPOCH_MS
        if now_ms > self._last_ms:
            self._last_ms = now_ms
            self._sequence = 0
        else:
            # Same millisecond, or the clock stepped back: keep counting forward.
            self._sequence += 1
            if self._sequence > _MAX_SEQUENCE:
                self._last_ms += 1
                self._sequence = 0
        return (self._last_ms << (NODE_BITS + SEQUENCE_BITS)) | self._node_bits | self._sequence

    @staticmethod
    def timestamp_ms(message_id: int) -> int:
        """The node time (epoch milliseconds) encoded in an id."""
        return (message_id >> (NODE_BITS + SEQUENCE_BITS)) + EPOCH_MS


def first_id_at(epoch_ms: int) -> int:
    """The lowest id any node gives at or after ``epoch_ms``: every id below it was
    given earlier (what the timeline's retention purge deletes by)."""
    return max(0, epoch_ms - EPOCH_MS) << (NODE_BITS + SEQUENCE_BITS)
