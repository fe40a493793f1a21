"""Cumulative acknowledgement of group messages: one ack:R per conversation stands for
every message shown there up to its ``through_seq`` (docs/protocol.md "Acknowledging
cumulatively").

A group of 500 members that posts one message costs the node 499 msg:N; if each
member answered each with its own ack:R, the node would read, open and answer 499
more frames per message, as many as it sent. So a group conversation's ack:R waits
until ``GROUP_ACK_EVERY`` messages of it were shown or ``GROUP_ACK_DELAY`` has passed
since the first one not yet acknowledged, whichever comes first, and then names the
newest (``msg_id``) and the watermark (``through_seq``). Nothing is lost by waiting: a
message whose ack never left (the connection dropped, the app was killed) is past the
device's cursor and comes again at catch-up, where the inbox drops it as shown.

1:1 messages are acknowledged at once: their sender waits for "delivered" (the six
packets), and the node settles every 1:1 message of the conversation up to
``through_seq`` when that ack comes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from cim.protocols import cim_pb2

__all__ = ["GROUP_ACK_DELAY", "GROUP_ACK_EVERY", "CumulativeAcks"]

GROUP_ACK_EVERY = 32
"""Group messages shown in one conversation before its ack:R goes at once."""

GROUP_ACK_DELAY = 0.5
"""Seconds a group conversation's ack:R waits at most after the first message it
covers (well within ``[push] background_grace``, which waits for it)."""

GROUP_PREFIX = "g:"
"""Conversation keys of group timelines start with this."""

Send = Callable[[cim_pb2.AckR], None]


@dataclass(slots=True)
class _Owed:
    """The ack:R a conversation owes: its newest message and watermark so far."""

    msg_id: int
    through_seq: int
    count: int


class CumulativeAcks:
    """Collects the acks of group conversations and sends one ack:R per conversation."""

    def __init__(
        self,
        clock: IReactorTime,
        send: Send,
        every: int = GROUP_ACK_EVERY,
        delay: float = GROUP_ACK_DELAY,
    ) -> None:
        self._clock = clock
        self._send = send
        self._every = max(1, every)
        self._delay = delay
        self._owed: dict[str, _Owed] = {}
        self._timer: IDelayedCall | None = None

    def acknowledge(self, message: cim_pb2.Message, through_seq: int) -> None:
        """``message`` was shown and its conversation is shown up to ``through_seq``."""
        conversation = message.conversation
        if not conversation.startswith(GROUP_PREFIX) or not through_seq or self._delay <= 0:
            # 1:1 (its sender waits for "delivered"), or no watermark to stand for the
            # others (through_seq 0 moves no cursor): this message's own ack, now.
            self._send(
                cim_pb2.AckR(msg_id=message.id, conversation=conversation, through_seq=through_seq)
            )
            return
        owed = self._owed.get(conversation)
        if owed is None:
            owed = self._owed[conversation] = _Owed(message.id, through_seq, 0)
        else:
            owed.msg_id = message.id
            owed.through_seq = max(owed.through_seq, through_seq)
        owed.count += 1
        if owed.count >= self._every:
            del self._owed[conversation]
            self._send_owed(conversation, owed)
            return
        if self._timer is None:
            self._timer = self._clock.callLater(self._delay, self._due)

    def flush(self) -> None:
        """Send every ack owed now (before logging out, say)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._due()

    def forget(self) -> None:
        """The connection is gone: what was owed is past the cursors, and the next
        catch-up brings it again (the inbox drops it as shown, and acknowledges it)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._owed.clear()

    @property
    def owed(self) -> int:
        """Conversations with an ack:R waiting."""
        return len(self._owed)

    def _due(self) -> None:
        self._timer = None
        owed, self._owed = self._owed, {}
        for conversation, entry in owed.items():
            self._send_owed(conversation, entry)

    def _send_owed(self, conversation: str, owed: _Owed) -> None:
        self._send(
            cim_pb2.AckR(
                msg_id=owed.msg_id, conversation=conversation, through_seq=owed.through_seq
            )
        )
