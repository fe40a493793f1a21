"""Conversations the node asked to slow down, for the outbox (cim.client.delivery).

A node over a limit refuses a msg:R with ``ERROR`` ``RATE_LIMITED`` (or
``UNAVAILABLE``) and ``retry_after_ms``: the message was not taken, and neither is
any later one of the same conversation until it is (the node keeps the sender's
order, ``cim.limits.messages``). The outbox keeps the same order on its side:

- the refused message, and every later message of its conversation, is *held*: not
  transmitted, whatever the resend schedule or a reconnect says;
- when the retry-after has passed, the oldest held message goes alone (the *probe*);
- once the node takes the probe (msg:A), the next held one goes after the last
  retry-after again (about the node's rate), alone again; a refusal starts a new wait.
  So a paced conversation sends at the node's rate, one message at a time, never a
  burst that is refused whole, and no message overtakes an earlier one;
- when nothing is held any more, the conversation flows freely again.

A refusal that is no rate (UNAVAILABLE: the node could not write it durably) passes
``spacing=0``: once the probe is taken, the node is back, and every held message goes
at once, in order.

Only the order within a conversation is kept: other conversations go on meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Conversation", "Pacing"]

Conversation = tuple[str, str]
"""("user", name) or ("group", id): what the node keeps in order."""


@dataclass(eq=False)
class _Pause:
    held: set[int] = field(default_factory=set)
    probe: int | None = None
    until: float = 0.0
    interval: float = 0.0
    """The last retry-after: the spacing of the held messages that follow."""
    timer: IDelayedCall | None = None


class Pacing:
    """Which messages wait for a node's retry-after; ``send(seq)`` transmits one."""

    def __init__(self, clock: IReactorTime, send: Callable[[int], None]) -> None:
        self._clock = clock
        self._send = send
        self._pauses: dict[Conversation, _Pause] = {}

    def __len__(self) -> int:
        """Conversations being paced."""
        return len(self._pauses)

    def holds(self, conversation: Conversation, seq: int) -> bool:
        """Whether ``seq`` must not be transmitted now; a new message of a paced
        conversation is held from here on."""
        pause = self._pauses.get(conversation)
        if pause is None or seq == pause.probe:
            return False
        pause.held.add(seq)
        return True

    def refused(
        self,
        conversation: Conversation,
        seq: int,
        retry_after: float,
        spacing: float | None = None,
    ) -> None:
        """The node refused ``seq`` for now: hold it (and what follows) that long.

        ``spacing`` is the wait between the held messages once the probe is taken
        (default: ``retry_after``, the node's rate); 0 sends them all at once."""
        pause = self._pauses.get(conversation)
        if pause is None:
            pause = self._pauses[conversation] = _Pause()
        if pause.probe == seq:
            pause.probe = None
        pause.held.add(seq)
        pause.interval = retry_after if spacing is None else spacing
        # One reading of the clock: a real one moves between two, and on a loaded
        # machine by more than a short retry-after (callLater refuses a negative delay).
        now = self._clock.seconds()
        until = now + retry_after
        if until > pause.until or pause.timer is None:
            pause.until = max(until, pause.until)
            if pause.timer is not None and pause.timer.active():
                pause.timer.cancel()
            pause.timer = self._clock.callLater(pause.until - now, self._waited, conversation)

    def taken(self, conversation: Conversation, seq: int) -> None:
        """The node took ``seq`` (or answered it finally): the next held one may go."""
        pause = self._pauses.get(conversation)
        if pause is None:
            return
        pause.held.discard(seq)
        if pause.probe == seq:
            pause.probe = None
            if pause.held and pause.timer is None and not pause.interval:
                held = sorted(pause.held)
                pause.held.clear()
                self._end(conversation, pause)
                for next_seq in held:
                    self._send(next_seq)
            elif pause.held and pause.timer is None:
                pause.timer = self._clock.callLater(pause.interval, self._waited, conversation)
            else:
                self._next(conversation, pause)

    def ended(self, conversation: Conversation, seq: int) -> None:
        """``seq`` left the outbox (failed, stopped): it holds nothing back any more."""
        self.taken(conversation, seq)
        pause = self._pauses.get(conversation)
        if pause is not None and not pause.held and pause.probe is None:
            self._end(conversation, pause)

    def reconnected(self) -> None:
        """A new connection (the outbox has sent what is not held, the probes among
        them): a paced conversation whose wait ended while disconnected goes on."""
        for conversation, pause in list(self._pauses.items()):
            if pause.timer is None and pause.probe is None:
                self._next(conversation, pause)

    def stop(self) -> None:
        for pause in self._pauses.values():
            if pause.timer is not None and pause.timer.active():
                pause.timer.cancel()
        self._pauses.clear()

    def _waited(self, conversation: Conversation) -> None:
        pause = self._pauses.get(conversation)
        if pause is None:
            return
        pause.timer = None
        if pause.probe is None:
            self._next(conversation, pause)

    def _next(self, conversation: Conversation, pause: _Pause) -> None:
        if pause.timer is not None:
            return  # still waiting out a retry-after
        if not pause.held:
            self._end(conversation, pause)
            return
        pause.probe = min(pause.held)
        pause.held.discard(pause.probe)
        self._send(pause.probe)

    def _end(self, conversation: Conversation, pause: _Pause) -> None:
        if pause.timer is not None and pause.timer.active():
            pause.timer.cancel()
        if self._pauses.get(conversation) is pause:
            del self._pauses[conversation]
