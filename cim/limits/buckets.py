"""Token buckets per key: how fast each user or address may do something.

A bucket holds up to ``burst`` tokens and gains ``per_second`` of them each second;
each action takes one. A user may therefore act ``burst`` times at once and then at
the steady rate; an action without a token is refused with the seconds until one
will be there (the retry-after the refusal carries). Refused actions take nothing,
so a client that waits the retry-after gets through.

Buckets fill lazily (from the time of the last action), so an idle key costs no
timer; a bucket that is full again is the same as no bucket and is forgotten
(``cim.limits.keys``). The clock is injected; tests drive it with ``task.Clock``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from cim.limits.keys import IdleKeys

__all__ = ["UNLIMITED", "Rate", "TokenBuckets"]


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` tokens a second, at most ``burst`` saved up; 0 per second is
    no limit at all."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_second < 0 or (self.per_second > 0 and self.burst < 1):
            raise ValueError("a rate is positive (or 0 for none) with a burst of at least 1")

    @property
    def unlimited(self) -> bool:
        return self.per_second <= 0


UNLIMITED = Rate(0.0, 0)


class _Bucket:
    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float, rate: Rate) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.rate = rate

    def level(self, now: float) -> float:
        rate = self.rate
        return min(float(rate.burst), self.tokens + (now - self.stamp) * rate.per_second)


def _full(bucket: _Bucket, now: float) -> bool:
    return bucket.level(now) >= bucket.rate.burst


class TokenBuckets:
    """One bucket per key, all at ``rate`` unless a call names another (an operator's
    raised limit for one user); at most ``max_keys`` remembered."""

    def __init__(self, clock: IReactorTime, rate: Rate, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.rate = rate
        self._buckets: IdleKeys[Hashable, _Bucket] = IdleKeys(max_keys, _full)

    def __len__(self) -> int:
        """How many keys are remembered (for tests and memory checks)."""
        return len(self._buckets)

    def take(self, key: Hashable, rate: Rate | None = None) -> float:
        """Take a token for ``key``: 0.0 when taken, else the seconds until one will be
        there (and nothing is taken)."""
        rate = rate or self.rate
        if rate.unlimited:
            return 0.0
        now = self.clock.seconds()
        buckets = self._buckets
        buckets.sweep(now)
        bucket = buckets.get(key)
        if bucket is None or bucket.rate != rate:
            # New, or its rate changed (an operator raised it): a full bucket at the
            # new rate, so a raised limit holds at once.
            bucket = None
            level = float(rate.burst)
        else:
            level = bucket.level(now)
        if level < 1.0:
            return (1.0 - level) / rate.per_second
        if bucket is None:
            bucket = _Bucket(level - 1.0, now, rate)
        else:
            bucket.tokens, bucket.stamp = level - 1.0, now
        buckets.touch(key, bucket)
        return 0.0

    def wait(self, key: Hashable, rate: Rate | None = None) -> float:
        """The seconds until ``key`` has a token (0.0: now), taking nothing."""
        rate = rate or self.rate
        if rate.unlimited:
            return 0.0
        now = self.clock.seconds()
        self._buckets.sweep(now)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate:
            return 0.0
        level = bucket.level(now)
        return 0.0 if level >= 1.0 else (1.0 - level) / rate.per_second

    def give_back(self, key: Hashable) -> None:
        """Return a token taken for an action that did not happen after all."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        now = self.clock.seconds()
        bucket.tokens, bucket.stamp = bucket.level(now) + 1.0, now
        if _full(bucket, now):
            self._buckets.forget(key)

    def forget(self, key: Hashable) -> None:
        self._buckets.forget(key)
