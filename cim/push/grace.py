"""The grace a background device gets to acknowledge an entry before it is pushed.

A device whose app told the node it is in the background (APP_STATE_R) is connected
and gets each entry over IM, but the app may be suspended a moment later and never
show it. So its entry is not pushed at once, nor skipped: it waits ``[push]
background_grace`` for the device's acknowledgement (an ack:R with ``through_seq``,
or any other move of the device's cursor in the conversation to the entry or past
it). Acknowledged: nothing is pushed. Not: the entry goes to the collapse windows
like any other (``PushDecisions``), so it is still once per entry per device and
collapsed.

One timer per pending (user, device, conversation, seq), on the node's clock; the
number pending is bounded (``[push] background_pending``): past it an entry is not
held, it is pushed (collapsed) at once, since missing a push is worse than an extra
one. Nothing here is awaited by message delivery: the timers only call back.

An ack can overtake the decision (which reads the registrations first), so the last
cursor each (user, device, conversation) moved to is remembered too, for the
``limit`` keys moved most recently: an entry already acknowledged is not held.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from enum import Enum

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["BackgroundGrace", "GraceKey", "Held"]

GraceKey = tuple[str, str, str]
"""(user, device, conversation)."""


class Held(Enum):
    HELD = "held"
    """Waiting for the device's ack (or already waiting: decided once)."""
    ACKNOWLEDGED = "acknowledged"
    """The device's cursor is already at the entry or past it: no push."""
    FULL = "full"
    """Too many pending: push now."""


class BackgroundGrace:
    def __init__(self, clock: IReactorTime, grace: float, limit: int) -> None:
        self._clock = clock
        self.grace = grace
        self.limit = limit
        self._pending: dict[GraceKey, dict[int, IDelayedCall]] = {}
        self._count = 0
        self._cursors: OrderedDict[GraceKey, int] = OrderedDict()
        self.acknowledged_in_time = 0
        """Entries a background device acknowledged within the grace (not pushed)."""
        self.overflowed = 0
        """Entries pushed without a grace because too many were pending."""

    @property
    def pending(self) -> int:
        return self._count

    def wait(self, key: GraceKey, seq: int, expired: Callable[[], None]) -> Held:
        """Hold entry ``seq`` for the grace; ``expired`` is called if the device has
        not acknowledged it by then."""
        if self._cursors.get(key, 0) >= seq:
            self.acknowledged_in_time += 1
            return Held.ACKNOWLEDGED
        entries = self._pending.get(key)
        if entries is not None and seq in entries:
            return Held.HELD
        if self._count >= self.limit:
            self.overflowed += 1
            return Held.FULL
        call = self._clock.callLater(self.grace, self._expired, key, seq, expired)
        self._pending.setdefault(key, {})[seq] = call
        self._count += 1
        return Held.HELD

    def _expired(self, key: GraceKey, seq: int, expired: Callable[[], None]) -> None:
        self._forget(key, seq)
        expired()

    def _forget(self, key: GraceKey, seq: int) -> None:
        entries = self._pending.get(key)
        if entries is None or entries.pop(seq, None) is None:
            return
        self._count -= 1
        if not entries:
            del self._pending[key]

    def cursor_moved(self, key: GraceKey, seq: int) -> None:
        """The device dealt with the conversation up to ``seq``: the entries held up
        to there are acknowledged, and not pushed."""
        if seq > self._cursors.get(key, 0):
            self._cursors[key] = seq
        self._cursors.move_to_end(key)
        while len(self._cursors) > self.limit:
            self._cursors.popitem(last=False)
        entries = self._pending.get(key)
        if not entries:
            return
        for held in [s for s in entries if s <= seq]:
            call = entries[held]
            if call.active():
                call.cancel()
            self._forget(key, held)
            self.acknowledged_in_time += 1

    def stop(self) -> None:
        for entries in self._pending.values():
            for call in entries.values():
                if call.active():
                    call.cancel()
        self._pending.clear()
        self._cursors.clear()
        self._count = 0
