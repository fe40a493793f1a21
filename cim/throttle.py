"""Failed-login throttling, so guessing passwords costs the guesser time, not us CPU.

The router asks before it runs the password KDF: a blocked attempt is answered
without hashing anything.

Failures are counted in a sliding window rather than a token bucket
(``cim.limits.buckets``, which paces everything else): a guesser gets exactly
``max_failures`` tries in any ``window``, never a burst and then more. Both forget
idle keys the same way (``cim.limits.keys``).
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IReactorTime

from cim.limits.keys import IdleKeys

__all__ = ["FailedLoginThrottle"]


class FailedLoginThrottle:
    """At most ``max_failures`` failures per key in any sliding ``window`` seconds.

    A key whose failures have all left the window is forgotten, so an attacker
    inventing keys (user names, addresses) can only hold memory for one window, and
    never more than ``max_keys`` entries: past that the keys with the oldest failures
    are forgotten first.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_failures: int,
        window: float,
        max_keys: int = 100_000,
    ) -> None:
        if max_failures < 1 or window <= 0 or max_keys < 1:
            raise ValueError("max_failures, window and max_keys must be positive")
        self._clock = clock
        self._max_failures = max_failures
        self._window = window
        # Only the newest max_failures timestamps can decide a block, hence the maxlen.
        self._failures: IdleKeys[str, deque[float]] = IdleKeys(max_keys, self._stale)

    def _stale(self, failures: deque[float], now: float) -> bool:
        return failures[-1] <= now - self._window

    def blocked(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        now = self._clock.seconds()
        self._failures.sweep(now)
        failures = self._failures.get(key)
        if failures is None or len(failures) < self._max_failures:
            return 0.0
        return max(0.0, failures[0] + self._window - now)

    def record_failure(self, key: str) -> None:
        now = self._clock.seconds()
        self._failures.sweep(now)
        failures = self._failures.get(key)
        if failures is None:
            failures = deque(maxlen=self._max_failures)
        failures.append(now)
        self._failures.touch(key, failures)

    def record_success(self, key: str) -> None:
        self._failures.forget(key)

    def forgive(self, key: str) -> None:
        """Take back one failure recorded for ``key`` (the newest).

        For callers that count an attempt before its outcome is known, so that
        attempts running at once cannot all pass ``blocked``: an attempt that turns
        out not to be a failure is forgiven, leaving the others counted.
        """
        failures = self._failures.get(key)
        if failures is None:
            return
        failures.pop()
        if not failures:
            self._failures.forget(key)

    def __len__(self) -> int:
        """How many keys are remembered (for tests and memory checks)."""
        return len(self._failures)
