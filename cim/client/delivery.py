"""Reliable sending on the client: the outbox, without any I/O.

The outbox is the design's 等待ack队列 (失败重传): every sent message waits there for its
ack:N and ends exactly once, delivered, stored, accepted or failed. It only uses an
injected clock and callables, so the session wires it to a connection and the tests
drive it with ``task.Clock``. The receiving side (dedup and order per conversation) is
``cim.client.inbox``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cim.backends.backoff import Backoff
from cim.client.pacing import Conversation, Pacing
from cim.protocols import cim_pb2

RETRY_AUTO = "auto"
RETRY_MANUAL = "manual"
RETRY_MODES = (RETRY_AUTO, RETRY_MANUAL)

STATUS_NAMES = {
    cim_pb2.DELIVERED: "delivered",
    cim_pb2.STORED: "stored",
    cim_pb2.ACCEPTED: "accepted",
    cim_pb2.FAILED: "failed",
}
REASON_CONNECTION_CLOSED = "the connection closed before the receiver acknowledged"
_FINAL_REFUSALS = (cim_pb2.Error.BAD_REQUEST, cim_pb2.Error.FORBIDDEN)
"""Refusals a resend cannot change: the message fails at once (others are retried)."""


@dataclass(frozen=True)
class DeliveryOutcome:
    """The end of one sent message: delivered, stored, accepted or failed (with a reason)."""

    client_seq: int
    msg_id: int
    to: str
    status: str
    reason: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """How long a message waits for its ack:N, and what happens when a wait passes.

    ``auto`` (design: 做法一): the same msg:R goes again after each of ``delays``
    without an ack:N, and after the last resend the message has ``final_wait`` (default:
    the last delay) before it is reported failed; with the defaults the resends go at
    10 s, 40 s and 100 s and the failure at 160 s. While disconnected a due resend is
    skipped but the schedule runs on, so a message ends within the same bound however
    long the connection is down; a reconnect resends every waiting message at once.

    ``manual`` (design: 做法二): the message is reported failed as soon as the first
    delay passes or the connection drops; ``Outbox.resend`` is the user's retry.
    """

    mode: str = RETRY_AUTO
    delays: tuple[float, ...] = (10.0, 30.0, 60.0)
    final_wait: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in RETRY_MODES:
            raise ValueError(f"retry must be one of {', '.join(RETRY_MODES)}, not {self.mode!r}")
        if not self.delays or any(delay <= 0 for delay in self.delays):
            raise ValueError("retry delays must be positive, and there must be at least one")

    @property
    def waits(self) -> tuple[float, ...]:
        """The successive waits for ack:N; each one but the last ends in a resend."""
        if self.mode == RETRY_MANUAL:
            return self.delays[:1]
        final = self.final_wait if self.final_wait is not None else self.delays[-1]
        return (*self.delays, final)


Transmit = Callable[[cim_pb2.Message], bool]

_PACED = (cim_pb2.Error.RATE_LIMITED, cim_pb2.Error.UNAVAILABLE)

UNAVAILABLE_BACKOFF = Backoff(initial=0.2, maximum=5.0, jitter=0.5)
"""The wait before a msg:R refused UNAVAILABLE goes again (a database that could not take
the append is usually back in moments): 0.1-0.2 s, doubling with each refusal in a row,
at most 5 s; the node's ``retry_after_ms``, when longer, wins."""


def _conversation(message: cim_pb2.Message) -> Conversation:
    return ("group", message.group) if message.group else ("user", message.to)


@dataclass(eq=False)
class _Waiting:
    message: cim_pb2.Message
    to: str
    waiters: list[Deferred[DeliveryOutcome]]
    msg_id: int = 0
    stage: int = 0
    sends: int = 0
    refusals: int = 0
    timer: IDelayedCall | None = None


class Outbox:
    """Sent messages waiting for ack:N, each with its timer (design: 等待ack队列).

    ``transmit`` puts a msg:R on the current connection and says whether there was one;
    ``report`` is the application's ``on_outcome``. Every message is reported exactly
    once per send (``add`` or ``resend``), and each Deferred it returned fires with
    that same outcome; a Deferred never fails.

    Final answers: ack:N DELIVERED, STORED, ACCEPTED and FAILED all end the message,
    whatever the policy. That includes FAILED "the receiver disconnected before
    acknowledging": the receiver may or may not have shown it, and resending
    automatically could show it twice only if the receiver's dedup had forgotten it,
    but it could equally never end; the user decides (``resend``). An ERROR
    BAD_REQUEST for the message is final too. An ERROR UNAVAILABLE (the node could not
    write it durably: it did not take it) paces its conversation at once
    (``cim.client.pacing``): it and every later message of that conversation wait a
    short backoff (``UNAVAILABLE_BACKOFF``, or the node's ``retry_after_ms`` if longer),
    then go again one at a time in the user's order, whatever the policy; the ack:N
    wait goes on meanwhile. RATE_LIMITED with ``retry_after_ms`` paces the same way
    after the node's wait. Other ERRORs wait for the next resend in ``auto``.

    An ack:N that comes after the message was already reported (a manual wait passed
    first) is dropped, to keep the report single; resending the message then gets the
    node's real answer, since the node and the receiver deduplicate the resend.

    The outbox lives in memory only: messages waiting when the process stops are
    reported failed by ``fail_all``; none are persisted across a client restart.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        transmit: Transmit,
        report: Callable[[DeliveryOutcome], None],
        policy: RetryPolicy | None = None,
        keep_failed: int = 1000,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self._rng = rng
        self.policy = policy or RetryPolicy()
        self._transmit = transmit
        self._report = report
        self._keep_failed = keep_failed
        self._waiting: dict[int, _Waiting] = {}
        self.pacing = Pacing(clock, self._send_paced)
        # Failed messages the user may still resend, oldest first.
        self._failed: OrderedDict[int, tuple[cim_pb2.Message, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def waiting(self) -> list[int]:
        """The client_seq of every message waiting for ack:N, in order."""
        return sorted(self._waiting)

    def is_waiting(self, client_seq: int) -> bool:
        """Whether the message numbered ``client_seq`` still waits for its outcome."""
        return client_seq in self._waiting

    def failed(self) -> list[int]:
        """The client_seq of the failed messages ``resend`` still accepts, oldest first."""
        return list(self._failed)

    # --- the application's side -------------------------------------------------------

    def add(self, message: cim_pb2.Message, refuse: str | None = None) -> Deferred[DeliveryOutcome]:
        """Send a numbered message; ``refuse`` ends it failed at once with that reason.

        Without a connection, ``auto`` keeps the message for the next one (its timers
        run from now) while ``manual`` reports it failed at once.
        """
        to = message.to or message.group
        waiter: Deferred[DeliveryOutcome] = Deferred()
        entry = _Waiting(message, to, [waiter])
        if refuse is not None:
            self._finish(entry, DeliveryOutcome(message.client_seq, 0, to, "failed", refuse))
            return waiter
        self._start(entry)
        return waiter

    def resend(self, client_seq: int) -> Deferred[DeliveryOutcome]:
        """Send a message again with the same client_seq (the node answers a duplicate
        with the same server id, the receiver shows it once).

        For a failed message this starts a new wait with its own report; for one still
        waiting it only transmits now, and the Deferred fires with its coming outcome.
        Raises KeyError for a sequence the outbox does not know (any more).
        """
        entry = self._waiting.get(client_seq)
        waiter: Deferred[DeliveryOutcome] = Deferred()
        if entry is not None:
            entry.waiters.append(waiter)
            self._send(entry)
            return waiter
        message, to = self._failed.pop(client_seq)
        self._start(_Waiting(message, to, [waiter]))
        return waiter

    def _start(self, entry: _Waiting) -> None:
        seq = entry.message.client_seq
        self._waiting[seq] = entry
        if not self._send(entry) and self.policy.mode == RETRY_MANUAL:
            self._fail(entry, "not connected")
            return
        self._arm(entry)

    def _send(self, entry: _Waiting) -> bool:
        """Transmit now, unless its conversation is paced (then it waits its turn);
        False only without a connection."""
        if self.pacing.holds(_conversation(entry.message), entry.message.client_seq):
            return True
        sent = self._transmit(entry.message)
        if sent:
            entry.sends += 1
        return sent

    def _send_paced(self, client_seq: int) -> None:
        """The pacing's turn for a held message (without a connection, the reconnect
        sends it)."""
        entry = self._waiting.get(client_seq)
        if entry is not None and self._transmit(entry.message):
            entry.sends += 1

    def _arm(self, entry: _Waiting) -> None:
        wait = self.policy.waits[entry.stage]
        entry.timer = self.clock.callLater(wait, self._expired, entry)

    def _expired(self, entry: _Waiting) -> None:
        entry.timer = None
        if self._waiting.get(entry.message.client_seq) is not entry:
            return
        waits = self.policy.waits
        entry.stage += 1
        if entry.stage >= len(waits):
            if self.policy.mode == RETRY_MANUAL:
                why = f"no ack:N within {waits[0]:g} s"
            else:
                why = f"no ack:N within {sum(waits):g} s ({entry.sends} sends)"
            self._fail(entry, why)
            return
        self._send(entry)  # skipped while disconnected; the reconnect resends
        self._arm(entry)

    # --- the node's answers -----------------------------------------------------------

    def taken(self, answer: cim_pb2.MsgA) -> None:
        """msg:A: the node took the message and named it."""
        entry = self._waiting.get(answer.client_seq)
        if entry is not None:
            entry.msg_id = answer.msg_id
            entry.refusals = 0
            self.pacing.taken(_conversation(entry.message), answer.client_seq)

    def acknowledged(self, ack: cim_pb2.AckN) -> None:
        """ack:N: the final outcome from the node."""
        entry = self._waiting.get(ack.client_seq)
        if entry is None:
            self.log.debug(
                "ack:N for {seq} that is not waiting (late or repeated)", seq=ack.client_seq
            )
            return
        status = STATUS_NAMES.get(ack.status, "failed")
        self._finish(
            entry,
            DeliveryOutcome(
                ack.client_seq,
                ack.msg_id or entry.msg_id,
                ack.to or entry.to,
                status,
                ack.reason,
            ),
        )

    def refused(self, error: cim_pb2.Error) -> None:
        """ERROR about a msg:R: final for a bad request, paced with a retry-after,
        retried otherwise (auto)."""
        entry = self._waiting.get(error.client_seq)
        if entry is None or error.request_type not in (cim_pb2.MSG_R, 0):
            return
        retry_after = error.retry_after_ms / 1000
        if error.code == cim_pb2.Error.UNAVAILABLE:
            wait = max(retry_after, UNAVAILABLE_BACKOFF.delay(entry.refusals, self._rng))
            entry.refusals += 1
            conversation = _conversation(entry.message)
            self.pacing.refused(conversation, error.client_seq, wait, spacing=0.0)
            return
        if retry_after and error.code in _PACED:
            self.pacing.refused(_conversation(entry.message), error.client_seq, retry_after)
            return
        if error.code in _FINAL_REFUSALS or self.policy.mode == RETRY_MANUAL:
            self._fail(entry, error.message or cim_pb2.Error.Code.Name(error.code))

    # --- the connection ---------------------------------------------------------------

    def connection_made(self) -> None:
        """A new connection: in auto, everything still waiting goes again, in order."""
        if self.policy.mode != RETRY_AUTO:
            return
        for seq in sorted(self._waiting):
            self._send(self._waiting[seq])
        self.pacing.reconnected()

    def connection_lost(self, reason: str = REASON_CONNECTION_CLOSED) -> None:
        """In manual, the connection was the messages' only chance: they failed."""
        if self.policy.mode == RETRY_MANUAL:
            self.fail_all(reason)

    def fail_all(self, reason: str) -> None:
        """End every waiting message failed (the client stops or gives up)."""
        for seq in sorted(self._waiting):
            entry = self._waiting.get(seq)
            if entry is not None:
                self._fail(entry, reason)

    # --- ending -----------------------------------------------------------------------

    def _fail(self, entry: _Waiting, reason: str) -> None:
        seq = entry.message.client_seq
        self._finish(entry, DeliveryOutcome(seq, entry.msg_id, entry.to, "failed", reason))

    def _finish(self, entry: _Waiting, outcome: DeliveryOutcome) -> None:
        seq = entry.message.client_seq
        if self._waiting.get(seq) is entry:
            del self._waiting[seq]
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None
        self.pacing.ended(_conversation(entry.message), seq)
        if outcome.status == "failed":
            self._failed[seq] = (entry.message, entry.to)
            self._failed.move_to_end(seq)
            while len(self._failed) > self._keep_failed:
                self._failed.popitem(last=False)
        try:
            self._report(outcome)
        except Exception:
            self.log.failure("on_outcome raised for {seq}", seq=seq)
        for waiter in entry.waiters:
            if not waiter.called:  # a caller may have cancelled (timed out) its Deferred
                waiter.callback(outcome)
