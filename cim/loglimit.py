"""At most one log line per key per period, so a hostile peer cannot flood the log.

A client that sends a thousand bad frames a second would otherwise write a thousand
lines a second: the log is then both a disk-filling attack and useless for finding
anything else. The caller picks the key (a connection and a reason, say); the first
event of a key is logged, the ones after it within ``period`` are counted, and the
next line that is logged says how many were held back.

Memory is bounded: keys whose last line is older than ``period`` are forgotten, and
while ``max_keys`` recent keys are held a new key is held back too (counted in
``dropped``) rather than remembered. The clock is injected, like everywhere in cim.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.internet.interfaces import IReactorTime

__all__ = ["LogLimit"]


class LogLimit:
    """Says whether a line for ``key`` may be written now, and what was held back."""

    def __init__(self, clock: IReactorTime, period: float = 60.0, max_keys: int = 10_000) -> None:
        if period <= 0:
            raise ValueError("the period must be positive")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        # mypy without the zope plugin cannot type an interface's methods.
        self._seconds: Callable[[], float] = clock.seconds
        self.period = period
        self.max_keys = max_keys
        # key -> [time of its last line, lines held back since]
        self._keys: dict[Hashable, list[float]] = {}
        self._pruned_at = float("-inf")
        self.dropped = 0
        """Lines held back for keys that could not be remembered (the table was full)."""

    def __len__(self) -> int:
        return len(self._keys)

    def allow(self, key: Hashable) -> bool:
        """True: write the line now (then ``held_back(key)`` says how many were not)."""
        now = self._seconds()
        entry = self._keys.get(key)
        if entry is not None:
            if now - entry[0] < self.period:
                entry[1] += 1
                return False
            entry[0] = now
            return True
        if len(self._keys) >= self.max_keys:
            self._prune(now)
            if len(self._keys) >= self.max_keys:
                self.dropped += 1
                return False
        self._keys[key] = [now, 0]
        return True

    def held_back(self, key: Hashable) -> int:
        """Lines of ``key`` not written since its previous line; resets the count."""
        entry = self._keys.get(key)
        if entry is None:
            return 0
        count = int(entry[1])
        entry[1] = 0
        return count

    def _prune(self, now: float) -> None:
        # At most once per period: a table full of recent keys is not rescanned per call.
        if now - self._pruned_at < self.period:
            return
        self._pruned_at = now
        stale = [key for key, (last, _) in self._keys.items() if now - last >= self.period]
        for key in stale:
            del self._keys[key]
