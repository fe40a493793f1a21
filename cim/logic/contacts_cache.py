"""Remembered answers to "may this sender message that receiver", for the message path.

Every 1:1 message asks; a database read per message would cost more than the rest of
its path together, so each answer is kept for ``ttl`` seconds (refusals too: the
answer for a name without an account and for an account that refuses must cost the
same, or the time would tell them apart). A change made through this node's
``ContactBook`` drops the answers of every account it touched at once, and a read
that was running meanwhile is not kept; a change made elsewhere (another node, an
account created with cimctl) is seen once the answer is older than ``ttl``.
Concurrent questions about the same pair share one read, so messages that wait for
it are answered in the order they came.

An answer asked for in the last part of its life is read again in the background while
it still answers (``cim.caching``): a pair that keeps talking never waits for a read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from cim.caching import refresh_due

__all__ = ["DEFAULT_DECISION_CACHE_SIZE", "Decisions"]

DEFAULT_DECISION_CACHE_SIZE = 100_000
"""Pairs remembered; the least recently used go first (about 200 bytes each)."""

Pair = tuple[str, str]
Load = Callable[[str, str], "Deferred[bool]"]


@dataclass
class _Reading:
    """One database read, shared by everyone who asks about the pair while it runs."""

    waiters: list[Deferred[bool]] = field(default_factory=list)


class Decisions:
    """Cached answers, keyed by (sender, receiver); ``load`` reads one from the database."""

    def __init__(
        self,
        clock: IReactorTime,
        load: Load,
        ttl: float | None,
        size: int = DEFAULT_DECISION_CACHE_SIZE,
    ) -> None:
        self._clock = clock
        self._load = load
        self._ttl = ttl
        self._size = size
        self._answers: OrderedDict[Pair, tuple[bool, float]] = OrderedDict()
        self._by_user: dict[str, set[Pair]] = {}
        self._reading: dict[Pair, _Reading] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def known(self, sender: str, receiver: str) -> bool | None:
        """The remembered answer, or None when it has to be read."""
        pair = (sender, receiver)
        kept = self._answers.get(pair)
        if kept is None:
            return None
        allowed, read_at = kept
        ttl = self._ttl
        if ttl is not None:
            age = self._clock.seconds() - read_at
            if age >= ttl:
                self._drop(pair)
                return None
            if refresh_due(age, ttl) and pair not in self._reading:
                self._start_read(pair, [])  # this answer holds until the new one comes
        self._answers.move_to_end(pair)
        return allowed

    def decide(self, sender: str, receiver: str) -> Deferred[bool]:
        """The answer: from memory when known, else from one (shared) read."""
        allowed = self.known(sender, receiver)
        if allowed is not None:
            return succeed(allowed)
        pair = (sender, receiver)
        waiter: Deferred[bool] = Deferred()
        reading = self._reading.get(pair)
        if reading is not None:
            reading.waiters.append(waiter)
            return waiter
        self._start_read(pair, [waiter])
        return waiter

    def _start_read(self, pair: Pair, waiters: list[Deferred[bool]]) -> None:
        # The waiters are in place first: a read may answer at once.
        reading = self._reading[pair] = _Reading(waiters)
        started = self._clock.seconds()
        self._load(*pair).addBoth(self._read, pair, reading, started)

    def forget(self, user: str) -> None:
        """Drop every answer about ``user``, kept or being read (its rows changed)."""
        for pair in list(self._by_user.get(user, ())):
            self._drop(pair)
        for pair in [pair for pair in self._reading if user in pair]:
            del self._reading[pair]

    def _read(self, result: bool | Failure, pair: Pair, reading: _Reading, started: float) -> None:
        current = self._reading.get(pair) is reading
        if current:
            del self._reading[pair]
        if isinstance(result, Failure):
            for waiter in reading.waiters:
                waiter.errback(result)
            return
        if current:
            self._keep(pair, bool(result), started)
        for waiter in reading.waiters:
            waiter.callback(bool(result))

    def _keep(self, pair: Pair, allowed: bool, read_at: float) -> None:
        self._answers[pair] = (allowed, read_at)
        self._answers.move_to_end(pair)
        for user in pair:
            self._by_user.setdefault(user, set()).add(pair)
        while len(self._answers) > self._size:
            oldest = next(iter(self._answers))
            self._drop(oldest)

    def _drop(self, pair: Pair) -> None:
        if self._answers.pop(pair, None) is None:
            return
        for user in pair:
            pairs = self._by_user.get(user)
            if pairs is not None:
                pairs.discard(pair)
                if not pairs:
                    del self._by_user[user]
