"""The first check of every msg:R: may this sender post this message now?

``MessageGate.check`` runs before a message is claimed or accepted, synchronously, so
a message refused here was never taken: the sender gets ``ERROR`` with a code
(``RATE_LIMITED`` or ``UNAVAILABLE``) and ``retry_after_ms`` and sends the same
``MSG_R`` again after that long. It refuses, in this order: when the timelines are
behind (history is never dropped to relieve load: new messages wait instead), when
the group's fan-out backlog is full, and when the sender (and, for a group post, the
sender's group posts and the group itself) is out of tokens.

Order. A client pipelines: when message 7 of a conversation is refused, 8 and 9 may
be on the wire already, and a token that refills meanwhile would let 8 overtake 7.
So a refusal marks the (sender, device, conversation) with the lowest refused
``client_seq``; later sequence numbers of that conversation are refused the same way
until the marked one is taken, or until the mark expires ``MARK_GRACE`` seconds after
its retry-after (a client that gave up on it must not be blocked for ever).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from cim.limits.keys import IdleKeys
from cim.limits.policy import GROUP_MESSAGES, GROUP_POSTS, MESSAGES, RateLimits
from cim.protocols import cim_pb2

__all__ = ["MARK_GRACE", "MessageGate", "Refusal", "retry_after_ms"]

RATE_LIMITED = cim_pb2.Error.RATE_LIMITED
UNAVAILABLE = cim_pb2.Error.UNAVAILABLE

MARK_GRACE = 10.0
"""Seconds past its retry-after that a refused message holds back the later ones of
its conversation: far longer than any round trip, far shorter than a client's patience."""

ARCHIVE_RETRY = 1.0
"""Seconds a sender waits while the timelines catch up."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message was not taken, and when to send it again."""

    code: int
    retry_after: float
    text: str

    def error(self, client_seq: int) -> cim_pb2.Error:
        """The ERROR frame that tells the sender."""
        return cim_pb2.Error(
            code=self.code,  # type: ignore[arg-type]
            message=self.text,
            request_type=cim_pb2.MSG_R,
            client_seq=client_seq,
            retry_after_ms=retry_after_ms(self.retry_after),
        )


def retry_after_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up and at least 1: a client never retries too early."""
    return max(1, math.ceil(seconds * 1000))


@dataclass(slots=True)
class _Mark:
    seq: int
    refusal: Refusal
    retry_at: float


def _expired(mark: _Mark, now: float) -> bool:
    return mark.retry_at + MARK_GRACE <= now


Backlog = Callable[[str], "Refusal | None"]
"""Group id -> why its fan-out cannot take more now (cim.im.groups), or None."""

StoreWait = Callable[[], float]
"""Seconds new messages should wait for the timelines; 0.0 while they keep up."""


def _no_backlog(group: str) -> Refusal | None:
    return None


def _store_keeps_up() -> float:
    return 0.0


def _conversation_key(user: str, device: str, message: cim_pb2.Message) -> tuple[str, str, str]:
    """Where a refused message holds the ones after it: the sender's device and the
    conversation (a group's or a user's)."""
    return (user, device, f"g:{message.group}" if message.group else f"u:{message.to}")


class MessageGate:
    """Limits and bounds checked before a message is taken; keeps each sender's order."""

    def __init__(
        self,
        clock: IReactorTime,
        limits: RateLimits,
        backlog: Backlog = _no_backlog,
        store_wait: StoreWait = _store_keeps_up,
        max_marks: int = 100_000,
    ) -> None:
        self._clock = clock
        self._limits = limits
        self._backlog = backlog
        self._store_wait = store_wait
        self._marks: IdleKeys[tuple[str, str, str], _Mark] = IdleKeys(max_marks, _expired)

    def __len__(self) -> int:
        """Conversations holding refused messages (for tests and memory checks)."""
        return len(self._marks)

    def check(self, user: str, device: str, message: cim_pb2.Message) -> Refusal | None:
        """None: take the message (its tokens are counted). Else why not, and when to
        retry; nothing was counted."""
        now = self._clock.seconds()
        marks = self._marks
        seq = message.client_seq
        mark = None
        if marks:  # nearly always empty: no conversation holds a refused message
            marks.sweep(now)
            mark = marks.get(_conversation_key(user, device, message))
            if mark is not None and _expired(mark, now):
                marks.forget(_conversation_key(user, device, message))
                mark = None
            if mark is not None and seq > mark.seq:
                held = mark.refusal
                return Refusal(
                    held.code,
                    max(mark.retry_at - now, 0.001),
                    f"{held.text}; an earlier message of this conversation waits to be sent again",
                )
        refusal = self._refusal(user, message)
        if refusal is not None:
            if seq and (mark is None or seq <= mark.seq):
                key = _conversation_key(user, device, message)
                marks.touch(key, _Mark(seq, refusal, now + refusal.retry_after))
            return refusal
        if mark is not None and seq == mark.seq:
            marks.forget(_conversation_key(user, device, message))
        return None

    def _refusal(self, user: str, message: cim_pb2.Message) -> Refusal | None:
        wait = self._store_wait()
        if wait > 0:
            return Refusal(UNAVAILABLE, wait, "the message store is behind; send it again later")
        group = message.group
        if group:
            full = self._backlog(group)
            if full is not None:
                return full
        limits = self._limits
        wait = limits.take(MESSAGES, user)
        if wait > 0:
            return Refusal(RATE_LIMITED, wait, "you are sending messages too fast")
        if not group:
            return None
        wait = limits.take(GROUP_POSTS, user)
        if wait > 0:
            limits.give_back(MESSAGES, user)
            return Refusal(RATE_LIMITED, wait, "you are posting to groups too fast")
        wait = limits.take(GROUP_MESSAGES, group)
        if wait > 0:
            limits.give_back(GROUP_POSTS, user)
            limits.give_back(MESSAGES, user)
            return Refusal(RATE_LIMITED, wait, "this group is receiving messages too fast")
        return None
