"""State calls gathered while one is in flight, sent to Redis as one script call.

Each 1:1 message makes two calls on the state store: the dedup claim and, later, its
outcome. One EVALSHA per call cost the daemon the encoding, the reply timer and the
reply parsing each time, and Redis one command each. Here a call goes at once when
none of its kind is waiting for Redis (a quiet node adds no delay and no extra turn
of the reactor), and the calls made while one is in flight go together as the next
one when its reply is in: under load, one script call for all the claims (or
outcomes) of a turn or more. The scripts handle a batch's items in the order they
were made, and batches are sent in order, so the answers are those of the calls made
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
from twisted.python.failure import Failure

T = TypeVar("T")

PER_CALL = 256
"""Items per script call at most: bounds how long one script holds Redis."""


class Gather(Generic[T]):
    """Sends an item at once when no call is in flight, else gathers it for the next
    call (at most ``limit`` items each); ``send`` fires with one reply per item, in
    order."""

    def __init__(
        self, send: Callable[[Sequence[T]], Deferred[list[Any]]], limit: int = PER_CALL
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._send = send
        self._limit = limit
        self._items: list[T] = []
        self._answers: list[Deferred[Any]] = []
        self._in_flight = 0

    def call(self, item: T) -> Deferred[Any]:
        """Fires with the item's own reply, or fails as its batch's call failed."""
        answer: Deferred[Any] = Deferred()
        self._items.append(item)
        self._answers.append(answer)
        if not self._in_flight or len(self._items) >= self._limit:
            self.flush()
        return answer

    def flush(self) -> None:
        """Send what is gathered now."""
        while self._items:
            items, answers = self._items[: self._limit], self._answers[: self._limit]
            del self._items[: self._limit], self._answers[: self._limit]
            self._in_flight += 1
            try:
                d = self._send(items)
            except Exception:
                d = Deferred()
                d.errback(Failure())
            d.addBoth(self._returned)
            d.addCallbacks(_answer, _fail, callbackArgs=(answers,), errbackArgs=(answers,))
            # What was called meanwhile (answers' callbacks included) goes next.
            d.addCallback(self._next)

    def _returned(self, result: Any) -> Any:
        self._in_flight -= 1
        return result

    def _next(self, _: object) -> None:
        if not self._in_flight:
            self.flush()


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
