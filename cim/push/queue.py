"""The node's queue of pushes: bounded, urgent first, retried as the providers ask.

A provider that is slow or down must not hold messages back, so nothing waits for a
push: the decision hands it here and goes on. The queue holds at most ``size``
pushes (waiting, in flight or waiting to retry); past that a non-urgent push is
dropped and counted, and an urgent one (an SOS) takes the place of the oldest
non-urgent one waiting, or is taken over the bound when there is none (the SOS rate
limit keeps them few).

Answers (cim.push.notification.Outcome): ``accepted`` is done; ``dead`` removes the
registration; ``retry`` waits the provider's Retry-After when it gave one, else the
one backoff policy (cim.backends.backoff, jittered), and tries again: a non-urgent
push ``max_attempts`` times in all, an urgent one until it is accepted, its SOS
alarm is acknowledged (``alarm_open``: someone took charge) or its TTL is over;
``failed`` is given up at once.

A provider that is down is not hammered: after ``BREAKER_AFTER`` requests in a row
fail (refused, timed out, 5xx, 429), its pushes are held (still counted in the
bound) and one request probes it when the breaker's backoff ends; the first answer
that is not a failure (accepted, a dead token, a refusal of the push itself) lets
what is held go again. A node whose provider is down then costs what the decisions
cost, not a stream of failing requests (docs/benchmarks.md, figure 10).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.metrics import PushMetrics
from cim.push.notification import ACCEPTED, DEAD, RETRY, Notification, Outcome

__all__ = ["PushQueue", "QueueSettings"]

MAX_RETRY_AFTER = 3600.0
"""A Retry-After is honoured up to an hour; a longer one is read as an hour."""
BREAKER_AFTER = 3
"""Failed requests in a row after which a provider's pushes are held."""
BREAKER = Backoff(1.0, 60.0, jitter=0.5)
"""How long a held provider waits before the next probe (after the n-th failed probe)."""


@dataclass(frozen=True)
class QueueSettings:
    size: int = 10000
    concurrency: int = 8
    backoff: Backoff = field(default_factory=lambda: Backoff(1.0, 300.0, jitter=0.5))
    max_attempts: int = 5


@dataclass
class _Entry:
    notification: Notification
    attempts: int = 0
    probe: bool = False
    """Sent to find out whether a held provider answers again."""


@dataclass
class _Provider:
    """The breaker of one provider: failures in a row, and the pushes it holds."""

    failures: int = 0
    until: float = 0.0
    probing: bool = False
    urgent: deque[_Entry] = field(default_factory=deque)
    normal: deque[_Entry] = field(default_factory=deque)
    wake: IDelayedCall | None = None

    @property
    def tripped(self) -> bool:
        return self.failures >= BREAKER_AFTER

    @property
    def held(self) -> int:
        return len(self.urgent) + len(self.normal)


Send = Callable[[Notification], "Deferred[Outcome]"]
TokenDead = Callable[[Notification, Outcome], Any]
AlarmOpen = Callable[[int], "Deferred[bool]"]


class PushQueue:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        send: Send,
        token_dead: TokenDead,
        settings: QueueSettings,
        metrics: PushMetrics,
        rng: random.Random | None = None,
        alarm_open: AlarmOpen | None = None,
    ) -> None:
        self._clock = clock
        self._alarm_open = alarm_open
        self._send = send
        self._token_dead = token_dead
        self.settings = settings
        self._metrics = metrics
        self._rng = rng
        self._urgent: deque[_Entry] = deque()
        self._normal: deque[_Entry] = deque()
        self._in_flight = 0
        self._retrying: dict[int, IDelayedCall] = {}
        self._next_retry = 0
        self._stopped = False
        self._providers: dict[str, _Provider] = {}

    @property
    def depth(self) -> int:
        """Pushes this node holds: waiting, in flight, waiting to retry, or held for a
        provider that is down."""
        held = sum(state.held for state in self._providers.values())
        return len(self._urgent) + len(self._normal) + self._in_flight + len(self._retrying) + held

    def _state(self, provider: str) -> _Provider:
        state = self._providers.get(provider)
        if state is None:
            state = self._providers[provider] = _Provider()
        return state

    def put(self, notification: Notification) -> bool:
        """Take a push; False when it was dropped (the queue is full, or stopped)."""
        provider = notification.registration.provider
        if self._stopped:
            self._metrics.count(provider, "dropped")
            return False
        if self.depth >= self.settings.size:
            if not notification.urgent:
                self._metrics.count(provider, "dropped")
                return False
            if self._normal:
                displaced = self._normal.popleft()
                self._metrics.count(displaced.notification.registration.provider, "dropped")
        entry = _Entry(notification)
        (self._urgent if notification.urgent else self._normal).append(entry)
        self._pump()
        return True

    def _pump(self) -> None:
        while not self._stopped and self._in_flight < self.settings.concurrency:
            if self._urgent:
                entry = self._urgent.popleft()
            elif self._normal:
                entry = self._normal.popleft()
            else:
                return
            state = self._state(entry.notification.registration.provider)
            if state.tripped:
                if state.probing or self._clock.seconds() < state.until:
                    self._hold(state, entry)
                    continue
                state.probing = entry.probe = True  # does it answer again?
            self._in_flight += 1
            entry.attempts += 1
            d = maybeDeferred(self._send, entry.notification)
            d.addErrback(self._send_failed)
            d.addCallback(self._answered, entry)
            d.addErrback(self._broken)

    def _hold(self, state: _Provider, entry: _Entry) -> None:
        (state.urgent if entry.notification.urgent else state.normal).append(entry)
        if state.wake is None and not state.probing:
            delay = max(0.0, state.until - float(self._clock.seconds()))
            state.wake = self._clock.callLater(delay, self._probe, state)

    def _probe(self, state: _Provider) -> None:
        """The breaker's wait is over: one held push goes (urgent first)."""
        state.wake = None
        if self._stopped:
            return
        if state.urgent:
            self._urgent.appendleft(state.urgent.popleft())
        elif state.normal:
            self._normal.appendleft(state.normal.popleft())
        self._pump()

    def _release(self, state: _Provider) -> None:
        """The provider answers again: what it held goes back, in order, first."""
        if state.wake is not None and state.wake.active():
            state.wake.cancel()
        state.wake = None
        self._urgent.extendleft(reversed(state.urgent))
        self._normal.extendleft(reversed(state.normal))
        state.urgent.clear()
        state.normal.clear()

    def _breaker(self, entry: _Entry, failed: bool, now: float) -> None:
        state = self._state(entry.notification.registration.provider)
        if entry.probe:
            entry.probe = state.probing = False
        provider = entry.notification.registration.provider
        if not failed:
            if state.tripped:
                self.log.info("push provider {provider} answers again", provider=provider)
            state.failures, state.until = 0, 0.0
            self._release(state)
            return
        state.failures += 1
        if not state.tripped:
            return
        if state.failures == BREAKER_AFTER:
            self.log.warn(
                "push provider {provider}: {count} requests failed in a row; its pushes "
                "wait, and one request at a time finds out when it answers again",
                provider=provider,
                count=state.failures,
            )
        state.until = now + BREAKER.after(state.failures - BREAKER_AFTER + 1, self._rng)
        if state.wake is None and state.held:
            state.wake = self._clock.callLater(state.until - now, self._probe, state)

    def _send_failed(self, failure: Failure) -> Outcome:
        self.log.failure("a push provider failed", failure)
        return Outcome(RETRY, reason=failure.getErrorMessage())

    def _broken(self, failure: Failure) -> None:
        self.log.failure("the push queue failed to act on an answer", failure)

    def _answered(self, outcome: Outcome, entry: _Entry) -> None:
        self._in_flight -= 1
        notification = entry.notification
        provider = notification.registration.provider
        now = float(self._clock.seconds())
        self._breaker(entry, outcome.kind == RETRY, now)
        if outcome.kind == ACCEPTED:
            self._metrics.count(provider, ACCEPTED)
            self._metrics.latency.observe(now - notification.appended_at)
        elif outcome.kind == DEAD:
            self._metrics.count(provider, DEAD)
            self._token_dead(notification, outcome)
        elif outcome.kind == RETRY and self._may_retry(entry, now):
            self._metrics.count(provider, "retried")
            self._retry_later(entry, outcome)
        else:
            self._metrics.count(provider, "failed" if outcome.kind != RETRY else "gave_up")
            self.log.info(
                "push to {user}'s {device} ({provider}) given up: {status} {reason}",
                user=notification.registration.user,
                device=notification.registration.device,
                provider=provider,
                status=outcome.status,
                reason=outcome.reason,
            )
        self._pump()

    def _may_retry(self, entry: _Entry, now: float) -> bool:
        if self._stopped:
            return False
        notification = entry.notification
        if notification.urgent:
            return now - notification.appended_at < max(notification.ttl, 60.0)
        return entry.attempts < self.settings.max_attempts

    def _retry_later(self, entry: _Entry, outcome: Outcome) -> None:
        if outcome.retry_after is not None:
            delay = min(max(outcome.retry_after, 0.0), MAX_RETRY_AFTER)
        else:
            delay = self.settings.backoff.after(entry.attempts, self._rng)
        number = self._next_retry
        self._next_retry += 1

        def again() -> None:
            alarm = entry.notification.alarm
            if alarm is None or self._alarm_open is None:
                requeue(True)
                return
            d = self._alarm_open(alarm)
            d.addErrback(lambda failure: True)  # cannot tell: keep trying
            d.addCallback(requeue)

        def requeue(wanted: bool) -> None:
            self._retrying.pop(number, None)
            if self._stopped:
                return
            if not wanted:
                # Someone took charge of the alarm: waking this phone is moot now.
                self._metrics.count(entry.notification.registration.provider, "acknowledged")
            else:
                (self._urgent if entry.notification.urgent else self._normal).appendleft(entry)
            self._pump()

        self._retrying[number] = self._clock.callLater(delay, again)

    def stop(self) -> None:
        """Drop what waits (docs/push.md: a stopping node's pushes are lost); what is in
        flight finishes on its own."""
        self._stopped = True
        for call in self._retrying.values():
            if call.active():
                call.cancel()
        self._retrying.clear()
        self._urgent.clear()
        self._normal.clear()
        for state in self._providers.values():
            if state.wake is not None and state.wake.active():
                state.wake.cancel()
            state.wake = None
            state.urgent.clear()
            state.normal.clear()
