"""Failed-login throttling, so guessing passwords costs the guesser time, not us CPU.

The router asks before it runs the password KDF: a blocked attempt is answered
without hashing anything.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet.interfaces import IReactorTime


class FailedLoginThrottle:
    """At most ``max_failures`` failures per key in any sliding ``window`` seconds.

    Keys are kept in order of their latest failure, so the keys whose failures have
    all left the window sit at the front and are dropped cheaply on every call. An
    attacker inventing keys (user names, addresses) can therefore only hold memory for
    one window, and never more than ``max_keys`` entries: past that the keys with the
    oldest failures are forgotten first.
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
        self._max_keys = max_keys
        # Only the newest max_failures timestamps can decide a block, hence the maxlen.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        now = self._clock.seconds()
        self._drop_stale(now)
        failures = self._failures.get(key)
        if failures is None or len(failures) < self._max_failures:
            return 0.0
        return max(0.0, failures[0] + self._window - now)

    def record_failure(self, key: str) -> None:
        now = self._clock.seconds()
        self._drop_stale(now)
        failures = self._failures.get(key)
        if failures is None:
            failures = self._failures[key] = deque(maxlen=self._max_failures)
        else:
            self._failures.move_to_end(key)
        failures.append(now)
        while len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)

    def record_success(self, key: str) -> None:
        self._failures.pop(key, None)

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
            del self._failures[key]

    def __len__(self) -> int:
        """How many keys are remembered (for tests and memory checks)."""
        return len(self._failures)

    def _drop_stale(self, now: float) -> None:
        horizon = now - self._window
        while self._failures:
            key, failures = next(iter(self._failures.items()))
            if failures[-1] > horizon:
                break
            del self._failures[key]
