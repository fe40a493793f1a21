"""The one backoff policy: how long to wait before trying again, everywhere in cim.

Reconnecting links (Redis, RabbitMQ), the bus's redelivery of a failed message, the
batch writers' retries against a failing database and the client library's reconnects
all wait the same way: a step that grows by ``factor`` from ``initial`` up to
``maximum``, of which a share (``jitter``) is random so that a fleet of nodes (or of
clients) that lost the same server does not come back in lockstep.

The step is Twisted's ``backoffPolicy`` (what ``ClientService`` takes), so the numbers
mean what they mean there: attempt 0 waits ``initial``. Twisted adds its jitter on top
of the step, which would let the wait exceed ``maximum``; here the random share is
taken from inside the step instead, so ``maximum`` is the longest wait there is.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from twisted.application.internet import backoffPolicy

__all__ = ["Backoff"]

_shared_random = random.Random()


def _no_jitter() -> float:
    return 0.0


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff, optionally jittered.

    ``jitter`` is the random share of each step: 0 waits the step exactly (a
    redelivery, a retried batch: one process, nothing to spread), 0.2 waits between
    80 % and 100 % of it (links: a fleet reconnecting), 0.5 is "equal jitter" (half
    fixed, half random: clients).
    """

    initial: float
    maximum: float
    jitter: float = 0.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter is a share of the step, from 0 to 1")
        if self.factor < 1.0:
            raise ValueError("a backoff factor below 1 would shrink the wait")

    def step(self, attempt: int) -> float:
        """The wait before retry ``attempt`` (0 for the first), without jitter."""
        policy = backoffPolicy(self.initial, self.maximum, self.factor, jitter=_no_jitter)
        return policy(max(0, attempt))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry ``attempt`` (0 for the first), jittered.

        ``rng`` makes the jitter reproducible (tests, the client's seeded source);
        without it a shared source is used.
        """
        step = self.step(attempt)
        if not self.jitter:
            return step
        return (rng or _shared_random).uniform(step * (1.0 - self.jitter), step)

    def after(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after the ``failures``-th failure in a row (1 for the first)."""
        return self.delay(failures - 1, rng)

    def policy(self, rng: random.Random | None = None) -> Callable[[int], float]:
        """This backoff as a ``ClientService`` retry policy.

        ``ClientService`` counts failed attempts from 1, so its first wait is
        ``initial`` here too.
        """
        return lambda failed_attempts: self.after(failed_attempts, rng)
