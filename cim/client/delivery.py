"""Reliable delivery on the client: the outbox and the inbox, without any I/O.

The outbox is the design's 等待ack队列 (失败重传): every sent message waits there for its
ack:N and ends exactly once, delivered, stored, accepted or failed. The inbox sits
between the connection and the application: it drops duplicates (消息去重, through a
``SeenStore``) and puts each sender's messages back in order (时序性) before anyone sees
them. Both only use an injected clock and callables, so the session wires them to a
connection and the tests drive them with ``task.Clock``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cim.client.pacing import Conversation, Pacing
from cim.client.seen import SeenStore
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
    BAD_REQUEST for the message is final too. An ERROR with ``retry_after_ms``
    (RATE_LIMITED, UNAVAILABLE: the node did not take it) paces its conversation
    (``cim.client.pacing``): it and every later message of that conversation wait,
    then go again one at a time in order, whatever the policy. Other ERRORs wait for
    the next resend in ``auto``.

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
    ) -> None:
        self.clock = clock
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
        if error.retry_after_ms and error.code in _PACED:
            self.pacing.refused(
                _conversation(entry.message), error.client_seq, error.retry_after_ms / 1000
            )
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


# ------------------------------------------------------------------------ the inbox


@dataclass(eq=False)
class _Held:
    message: cim_pb2.Message
    order: int
    arrived: float
    also_ack: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Stream:
    """One ordering unit: a sender's device (by client_seq) or a group (by group_seq)."""

    key: tuple[str, ...]
    group: bool
    held: dict[int, _Held] = field(default_factory=dict)
    timer: IDelayedCall | None = None
    asked: bool = False  # the missing one was asked for once (gap_persists)


class Inbox:
    """Between the connection and the application: dedup, then order, then hand over.

    Dedup: a msg:N whose server id, or whose (sender, sender device, client_seq), was
    handed over before (``SeenStore``) or is being held right now is dropped, and still
    acknowledged so the node settles it.

    Order, 1:1 (design: ClientB 根据seq修正): per sender device, a message whose
    client_seq follows the last one handed over (or the first ever seen from that
    device) goes at once; one after a gap is held for ``window`` seconds in case the
    missing one is late, then everything held that long goes in sequence order. Gaps are
    not always losses: a device numbers all its messages, so those it sent to others or
    that failed before reaching the node leave holes. A message older than the last
    handed over (it came after its window) is handed over at once, out of order rather
    than never.

    Order, groups (design: 群聊以服务器收到的顺序为准): every group message is held for
    ``window`` and released in server-id order, which is the same for every member;
    when a message's window ends, it goes with every held one of a lower id. One that
    arrives after a higher id was already released is counted ``late`` and goes through
    the same window, after the others.

    The acknowledgement (ack:R) is sent when the message is handed over, not when it
    arrives: an ack:N DELIVERED then means the application has it. ``window`` 0 turns
    holding off (arrival order). ``deliver`` returning False declines the message: it is
    not acknowledged, so the node keeps it. After ``close`` nothing more is handed over
    or acknowledged, held messages included: the node keeps those too.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        seen: SeenStore,
        deliver: Callable[[cim_pb2.Message], object],
        acknowledge: Callable[[int], None],
        window: float = 0.5,
        max_groups: int = 10_000,
    ) -> None:
        self.clock = clock
        self.seen = seen
        self.window = window
        self._deliver = deliver
        self._acknowledge = acknowledge
        self._streams: dict[tuple[str, ...], _Stream] = {}
        self._held_ids: dict[int, _Held] = {}
        self._held_seqs: dict[tuple[str, str, int], _Held] = {}
        self._group_marks: OrderedDict[str, int] = OrderedDict()
        self._max_groups = max_groups
        self.duplicates = 0
        # Called when a gap outlasts the window, before giving up on the missing one.
        self.gap_persists: Callable[[], object] | None = None
        self.late = 0
        self.closed = False

    @property
    def held(self) -> int:
        return len(self._held_ids)

    def receive(self, message: cim_pb2.Message) -> None:
        """A msg:N from the node."""
        if self.closed:
            return  # unacknowledged: the node keeps it for the next login
        sender, device, seq = getattr(message, "from"), message.device, message.client_seq
        seq_key = (sender, device, seq)
        held = self._held_ids.get(message.id) or (self._held_seqs.get(seq_key) if seq else None)
        if held is not None:
            self.duplicates += 1
            if message.id != held.message.id and message.id not in held.also_ack:
                held.also_ack.append(message.id)
            return
        if self.seen.is_duplicate(message.id, sender, device, seq):
            self.duplicates += 1
            self._ack(message.id)
            return
        if message.group:
            self._group_arrived(message)
        else:
            self._peer_arrived(message)

    def flush(self) -> None:
        """Hand over everything held now, each stream in order (the client stops)."""
        for stream in list(self._streams.values()):
            self._release(stream, max(stream.held))

    def close(self) -> None:
        """Hand over nothing more; what is held is dropped unacknowledged (the node keeps
        it). A message being handed over right now is still acknowledged."""
        self.closed = True
        for stream in list(self._streams.values()):
            for order in list(stream.held):
                self._unhold(stream, order)
            self._forget_if_empty(stream)

    # --- arrival ----------------------------------------------------------------------

    def _peer_arrived(self, message: cim_pb2.Message) -> None:
        sender, device, seq = getattr(message, "from"), message.device, message.client_seq
        last = self.seen.last_seq(sender, device)
        key = ("peer", sender, device)
        follows = last is not None and 0 < message.prev_seq <= last
        if self.window <= 0 or seq <= 0 or last is None or seq <= last + 1 or follows:
            if last is not None and 0 < seq <= last:
                self.late += 1
            self._hand_over(_Held(message, seq, self.clock.seconds()))
            stream = self._streams.get(key)
            if stream is not None:
                self._drain(stream)
            return
        self._hold(key, False, _Held(message, seq, self.clock.seconds()))

    def _group_arrived(self, message: cim_pb2.Message) -> None:
        """Group messages go in the group's server-assigned sequence (group_seq).

        The sequence is dense, so a gap means a message really is still on its way
        (members on several nodes get the nodes' streams interleaved): only then are
        later ones held, for the window. A message without a sequence goes at once.
        """
        group, seq = message.group, message.group_seq
        last = self._group_marks.get(group)
        held = _Held(message, seq, self.clock.seconds())
        # The first one seen of a group may have earlier ones still on their way (from
        # other nodes): unless it is the group's very first, it waits for the window.
        first_known = last is None and seq == 1
        if self.window <= 0 or seq <= 0 or first_known or (last is not None and seq <= last + 1):
            if last is not None and 0 < seq <= last:
                self.late += 1
            self._hand_over(held)
            stream = self._streams.get(("group", group))
            if stream is not None:
                self._drain(stream)
            return
        self._hold(("group", group), True, held)

    def _hold(self, key: tuple[str, ...], group: bool, held: _Held) -> None:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(key, group)
        stream.held[held.order] = held
        message = held.message
        self._held_ids[message.id] = held
        if message.client_seq:
            self._held_seqs[(getattr(message, "from"), message.device, message.client_seq)] = held
        if stream.timer is None:
            self._schedule(stream)

    def _schedule(self, stream: _Stream) -> None:
        first = min(held.arrived for held in stream.held.values())
        delay = max(0.0, first + self.window - self.clock.seconds())
        stream.timer = self.clock.callLater(delay, self._window_ended, stream)

    def _window_ended(self, stream: _Stream) -> None:
        stream.timer = None
        if not stream.asked and self.gap_persists is not None:
            # The missing one may be waiting in the offline store (stored while this
            # client was reconnecting): ask for it once and give it one more window.
            stream.asked = True
            self.gap_persists()
            stream.timer = self.clock.callLater(self.window, self._window_ended, stream)
            return
        now = self.clock.seconds() + 1e-9
        due = [order for order, held in stream.held.items() if held.arrived + self.window <= now]
        if due:
            self._release(stream, max(due))
        if stream.held and stream.timer is None:
            self._schedule(stream)

    # --- hand-over --------------------------------------------------------------------

    def _release(self, stream: _Stream, upto: int) -> None:
        """Hand over every held message of the stream up to ``upto``, in order."""
        for order in sorted(order for order in stream.held if order <= upto):
            self._hand_over(self._unhold(stream, order))
        self._drain(stream)

    def _drain(self, stream: _Stream) -> None:
        """After a hand-over, the held ones that now follow on go too."""
        while stream.held:
            if stream.group:
                last = self._group_marks.get(stream.key[1])
                if last is None:
                    break  # where the group starts for us is known only at the window's end
            else:
                last = self.seen.last_seq(*stream.key[1:3])
            following = last + 1 if last is not None else min(stream.held)
            if following not in stream.held:
                # A 1:1 message may follow on in its conversation (prev_seq), the gap
                # being messages its sender sent to others.
                first = min(stream.held)
                prev = stream.held[first].message.prev_seq
                if stream.group or last is None or not 0 < prev <= last:
                    break
                following = first
            self._hand_over(self._unhold(stream, following))
        self._forget_if_empty(stream)

    def _unhold(self, stream: _Stream, order: int) -> _Held:
        held = stream.held.pop(order)
        message = held.message
        self._held_ids.pop(message.id, None)
        if message.client_seq:
            seq_key = (getattr(message, "from"), message.device, message.client_seq)
            self._held_seqs.pop(seq_key, None)
        return held

    def _forget_if_empty(self, stream: _Stream) -> None:
        if stream.held:
            return
        if stream.timer is not None and stream.timer.active():
            stream.timer.cancel()
        stream.timer = None
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]

    def _hand_over(self, held: _Held) -> None:
        if self.closed:
            return  # the application takes no more: unacknowledged, the node keeps it
        message = held.message
        sender = getattr(message, "from")
        # Recorded first: if the process dies inside on_message, the message is not
        # acknowledged, so the sender hears "failed" rather than a duplicate appearing.
        # A store that cannot write (disk full) weakens dedup; it must not lose the message.
        try:
            self.seen.record(message.id, sender, message.device, message.client_seq)
        except Exception:
            self.log.failure("could not remember message {id}", id=message.id)
        if message.group and message.group_seq:
            group = message.group
            self._group_marks[group] = max(self._group_marks.get(group, 0), message.group_seq)
            self._group_marks.move_to_end(group)
            while len(self._group_marks) > self._max_groups:
                self._group_marks.popitem(last=False)
        try:
            taken = self._deliver(message)
        except Exception:
            self.log.failure("on_message raised for message {id}", id=message.id)
            taken = True
        if taken is False:
            return  # declined: the node keeps it (this inbox still counts it as seen)
        for msg_id in (message.id, *held.also_ack):
            self._ack(msg_id)

    def _ack(self, msg_id: int) -> None:
        try:
            self._acknowledge(msg_id)
        except Exception:
            self.log.failure("could not acknowledge message {id}", id=msg_id)
