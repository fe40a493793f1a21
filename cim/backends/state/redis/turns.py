"""Calls made during one reactor turn, sent to Redis as one script call at its end.

A node under load reads many frames per turn (many connections are readable at once),
and each 1:1 message makes two calls on the state store: the dedup claim and, later,
its outcome. One EVALSHA per call cost the daemon the encoding, the reply timer and
the reply parsing each time, and Redis one command each; gathered per turn they are
one command for the whole turn's claims (and one for its outcomes), whose script
handles them in the order they were made, so the answers are those of the calls made
one after the other.

Not the batch writer (cim.backends.batching): that one holds items and retries for as
long as it takes, which is right for a database write that must happen; a state call
must fail at once when Redis is unreachable (the sender is refused and resends), and
that is what a failed batch does to every call in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")

PER_CALL = 256
"""Items per script call at most: bounds how long one script holds Redis."""


class PerTurn(Generic[T]):
    """Gathers items until the end of the reactor turn, then ``send``s them in calls of
    at most ``limit``; ``send`` fires with one reply per item, in order."""

    def __init__(
        self,
        reactor: IReactorTime,
        send: Callable[[Sequence[T]], Deferred[list[Any]]],
        limit: int = PER_CALL,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._reactor = reactor
        self._send = send
        self._limit = limit
        self._items: list[T] = []
        self._answers: list[Deferred[Any]] = []
        self._timer: IDelayedCall | None = None

    def call(self, item: T) -> Deferred[Any]:
        """Fires with the item's own reply, or fails as its batch's call failed."""
        answer: Deferred[Any] = Deferred()
        self._items.append(item)
        self._answers.append(answer)
        if len(self._items) >= self._limit:
            self.flush()
        elif self._timer is None:
            # Delay 0: after every event of this turn has been handled, before the
            # reactor waits for more.
            self._timer = self._reactor.callLater(0, self.flush)
        return answer

    def flush(self) -> None:
        """Send what is gathered now."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        items, answers = self._items, self._answers
        if not items:
            return
        self._items, self._answers = [], []
        try:
            d = self._send(items)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addCallbacks(_answer, _fail, callbackArgs=(answers,), errbackArgs=(answers,))


def _answer(replies: list[Any], answers: list[Deferred[Any]]) -> None:
    if len(replies) != len(answers):
        _fail(
            Failure(ValueError(f"{len(replies)} replies to a batch of {len(answers)} calls")),
            answers,
        )
        return
    for answer, reply in zip(answers, replies, strict=True):
        answer.callback(reply)


def _fail(failure: Failure, answers: list[Deferred[Any]]) -> None:
    for answer in answers:
        answer.errback(failure)
