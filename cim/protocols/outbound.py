"""Outbound backpressure: what each connection has queued, and what the node does about it.

A client that never reads still gets every frame the node writes for it, and those
bytes wait in the node's memory: in Twisted's write buffer and in cim's own held
frames (``cim.protocols.held_writes.HeldWrites``). Two bounds keep that memory finite:

- **Per connection** (``[im] outbound_budget``): a receiver whose queued bytes reach
  its budget gets no further live copies (``OutboundBudget.may_take_live_copy``, the
  one place that decides it); what it misses is in its timeline already, and it is
  told to pull (OFFLINE_NOTICE) once its queue has drained. A receiver over its budget
  for ``[im] slow_reader_timeout`` is cut.
- **Per node** (``[im] max_queued_bytes``, and ``[im] max_pending_work``: messages
  waiting for their timeline append, or transactions waiting for the database):
  past either, the node stops
  reading from the connections that sent the most since the last decision
  (Twisted's producer API: ``pauseProducing`` on their connections), so the flood
  waits in their own sockets and clients, not here, and the database's queue stays
  short for everyone else (logins, consent checks, catch-up); they are resumed once
  both are below half their bound.

What is queued is counted, not read from Twisted's private buffers: every byte handed
to ``transport.write`` is added, and Twisted's consumer API says when the transport's
buffer is empty again (``cim.protocols.wire`` registers a pull producer whose
``resumeProducing`` Twisted calls then), which sets the count back to nothing. So the
count is an upper bound of what waits; a client that reads at all empties it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = [
    "NO_OUTBOUND_ACCOUNTING",
    "BudgetOwner",
    "NodeQueue",
    "OutboundAccounting",
    "OutboundBudget",
    "OutboundRules",
    "PausableSender",
]


class OutboundAccounting(Protocol):
    """What the framing (``cim.protocols.wire.FrameProtocol``) reports as it writes."""

    counting: bool
    """Whether anything listens: only then does the framing watch non-TCP transports."""

    def held(self, size: int) -> None:
        """A frame is held until the read that made it ends (cim's own queue)."""

    def released(self, size: int) -> None:
        """Held frames of ``size`` bytes leave for the socket or the transport."""

    def queued(self, size: int) -> None:
        """``size`` bytes went to ``transport.write``: they wait in its buffer."""

    def drained(self) -> None:
        """The transport said its buffer is empty: nothing of ours waits there."""


class _NoAccounting:
    """The client's side (and any connection nobody budgets): nothing is counted."""

    counting = False

    def held(self, size: int) -> None:
        pass

    def released(self, size: int) -> None:
        pass

    def queued(self, size: int) -> None:
        pass

    def drained(self) -> None:
        pass


NO_OUTBOUND_ACCOUNTING: OutboundAccounting = _NoAccounting()


class PausableSender(Protocol):
    """A connection the node may stop reading from (the IM server protocol)."""

    outbound: OutboundBudget

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


HEAVY_SENDER_RATE = 16 << 10
"""Bytes a second (since the previous decision) below which a sender is never paused:
a person chatting sends far less; a flood of 1 KB messages at 16 a second is more."""


BACKLOG_EVERY = 16
"""``NodeQueue.check`` looks at the database work once in this many calls."""
LOOK_INTERVAL = 0.01
"""Seconds between two looks for heavy senders (each goes over every connection);
doubled after each look that finds none, up to ``MAX_LOOK_INTERVAL``."""

MAX_LOOK_INTERVAL = 1.0

MAX_WINDOW = 2.0
"""Seconds of sending the choice of whom to pause is measured over, at most."""


class NodeQueue:
    """The node's bytes queued for all its connections and its work waiting for the
    database, and the senders paused for them.

    Past ``max_bytes`` or ``max_pending`` the heaviest senders are paused: ranked by
    the bytes each sent since the previous decision, the heaviest first, until the
    paused ones account for at least half of what all sent (at least one), never one
    that sent less than ``HEAVY_SENDER_RATE`` on average since then (measured over
    ``decision_interval`` to ``MAX_WINDOW`` seconds). The node looks at most every
    ``LOOK_INTERVAL``; while senders are paused, another decision, pausing more, is
    made only when the pressure (the larger of the two fractions of their bounds) has
    grown by half since the last one: a draining queue (a slow database) is waited
    for, and light senders (a chat beside the flood) are not paused for what they did
    not cause. Every ``decision_interval`` while any is paused, and whenever queued
    bytes leave, the node checks whether both are below half their bound: then every
    paused sender is resumed.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        max_bytes: int,
        senders: Callable[[], Iterable[PausableSender]],
        max_pending: int = 1000,
        decision_interval: float = 0.1,
    ) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.database_backlog: Callable[[], int] = lambda: 0
        """Work waiting for the database: messages waiting for their timeline append or
        transactions for the pool, whichever is more (set by the daemon; none
        without one)."""
        self.total = 0
        """Bytes queued for every connection of the node (held plus in transports)."""
        self._backlog_countdown = 0
        """Checks left before the next look at ``database_backlog``."""
        self.paused: set[PausableSender] = set()
        self._senders = senders
        self._decision_interval = decision_interval
        # Bytes each sender sent are counted from the start of the window.
        self._window_start = float("-inf")
        self._pressure_at_decision = 0.0
        self._looked_at = float("-inf")
        self._look_interval = LOOK_INTERVAL
        self._polling: IDelayedCall | None = None

    def grew(self, size: int) -> None:
        self.total += size
        if self.total >= self.max_bytes:
            self.over()

    def shrank(self, size: int) -> None:
        self.total -= size
        if self.paused:
            self.maybe_resume()

    @property
    def pending_work(self) -> int:
        """Messages waiting for their timeline append, or transactions for the database."""
        return self.database_backlog()

    def check(self) -> None:
        """Frames arrived: pause the heaviest senders if the node is over a bound.

        Called before the frames of each read are handled, and every
        ``cim.protocols.wire.ACTIVITY_EVERY`` frames of a long read: database work
        grows without telling the node. The bytes are looked at every time; the
        database work, a chain of calls into the pools, every ``BACKLOG_EVERY`` calls
        (the work those reads carried at most, a few hundred frames in a flood, is
        what the bound can be passed by).
        """
        if self.total >= self.max_bytes:
            self.over()
            return
        countdown = self._backlog_countdown
        if countdown:
            self._backlog_countdown = countdown - 1
            return
        self._backlog_countdown = BACKLOG_EVERY - 1
        if self.database_backlog() >= self.max_pending:
            self.over()

    @property
    def pressure(self) -> float:
        """How full the node is: 1.0 at a bound."""
        return max(self.total / self.max_bytes, self.pending_work / self.max_pending)

    def over(self) -> None:
        """The node is at a bound: pause the heaviest senders (at most every look)."""
        now = self.clock.seconds()
        if now - self._looked_at < self._look_interval:
            return
        self._looked_at = now
        pressure = self.pressure
        if self.paused and pressure < 1.5 * self._pressure_at_decision:
            return
        window = now - self._window_start
        # A long window (the node was calm) is judged as MAX_WINDOW: whoever sent that
        # much since it began is sending heavily now; a short one as the decision
        # interval, so one message is never "heavy".
        elapsed = min(max(window, self._decision_interval), MAX_WINDOW)
        if self._pause_heaviest(elapsed):
            self._pressure_at_decision = pressure
            self._start_window(now)
            self._look_interval = LOOK_INTERVAL
            return
        # Nobody heavy (a slow database, not a flood): each look goes over every
        # connection, so look less often, up to once a second.
        self._look_interval = min(2 * self._look_interval, MAX_LOOK_INTERVAL)
        if window > MAX_WINDOW:
            self._start_window(now)  # count afresh
        # Otherwise the window goes on: a sender just resumed, with nothing read yet,
        # is judged on its next read, not after a fresh window lets it in.

    def _start_window(self, now: float) -> None:
        self._window_start = now
        for sender in self._senders():
            sender.outbound.decided()

    def maybe_resume(self) -> None:
        """Resume every paused sender once both counts are below half their bound."""
        if self.total * 2 < self.max_bytes and self.pending_work * 2 < self.max_pending:
            self._resume_all()

    def _poll(self) -> None:
        # The database's queue shrinks without telling the node: look while paused.
        self._polling = None
        if self.paused:
            self.maybe_resume()
        if self.paused:
            self._polling = self.clock.callLater(self._decision_interval, self._poll)

    def forget(self, sender: PausableSender) -> None:
        """The connection is gone."""
        self.paused.discard(sender)

    def _pause_heaviest(self, elapsed: float) -> bool:
        candidates = [s for s in self._senders() if s not in self.paused]
        heavy = HEAVY_SENDER_RATE * elapsed
        ranked = sorted(
            (s for s in candidates if s.outbound.received_since_decision >= heavy),
            key=lambda s: s.outbound.received_since_decision,
            reverse=True,
        )
        everything = sum(s.outbound.received_since_decision for s in ranked)
        paused_share = 0
        chosen: list[PausableSender] = []
        for sender in ranked:
            if chosen and paused_share * 2 >= everything:
                break
            chosen.append(sender)
            paused_share += sender.outbound.received_since_decision
        first = not self.paused
        for sender in chosen:
            self.paused.add(sender)
            sender.pause_reading()
        if self.paused and self._polling is None:
            self._polling = self.clock.callLater(self._decision_interval, self._poll)
        if chosen and first:  # one line per episode, not one per decision
            self.log.warn(
                "{count} bytes queued for clients (limit {limit}), {pending} messages or "
                "transactions waiting for storage (limit {max_pending}): stopped reading "
                "from {senders} heaviest sender(s)",
                count=self.total,
                limit=self.max_bytes,
                pending=self.pending_work,
                max_pending=self.max_pending,
                senders=len(chosen),
            )
        return bool(chosen)

    def _resume_all(self) -> None:
        paused = list(self.paused)
        self.paused.clear()
        self._look_interval = LOOK_INTERVAL  # catch a resumed flood on its first read
        for sender in paused:
            sender.resume_reading()
        self.log.info(
            "{count} bytes queued for clients, {pending} waiting for storage: "
            "reading from {senders} sender(s) again",
            count=self.total,
            pending=self.pending_work,
            senders=len(paused),
        )


class BudgetOwner(Protocol):
    """The connection an ``OutboundBudget`` reports to (the IM server protocol).

    The budget holds its owner, not three bound methods of it: on a node holding tens
    of thousands of idle connections those would cost about 0.2 KiB each.
    """

    def cut_slow_reader(self) -> None:
        """Over the budget for ``slow_reader_timeout``: the connection is cut."""

    def pull_notice(self) -> None:
        """The queue drained after a live copy was refused: tell the client to pull."""

    def behind(self, over: bool) -> None:
        """The connection went over its budget (True) or is under it again (False)."""


class OutboundRules:
    """What every connection's budget of one node shares: the bound, the cut, the clock
    and the node's queue (one object per node, so a connection holds one reference)."""

    __slots__ = ("clock", "limit", "node", "slow_reader_timeout")

    def __init__(
        self, limit: int, slow_reader_timeout: float, clock: IReactorTime, node: NodeQueue
    ) -> None:
        self.limit = limit
        self.slow_reader_timeout = slow_reader_timeout
        self.clock = clock
        self.node = node


class OutboundBudget:
    """One connection's queued bytes against its budget, and the live-copy decision.

    ``over_budget`` starts when the queued bytes reach ``limit`` and ends only when
    the transport has sent everything (the one moment Twisted's consumer API reports).
    The owner's ``behind`` is told both moments (the connection stops reading the
    client's requests meanwhile: a client that does not read its answers cannot make
    the node produce more). While over, the owner's ``cut_slow_reader`` is called once
    ``slow_reader_timeout`` passes, and its ``pull_notice`` once it drains if a live
    copy was refused meanwhile (or a notice to pull was held back: it would only have
    queued behind the rest).
    """

    __slots__ = (
        "_cut",
        "_owner",
        "_rules",
        "held_bytes",
        "notice_owed",
        "over_since",
        "received",
        "received_at_decision",
        "transport_bytes",
    )

    counting = True

    def __init__(self, rules: OutboundRules, owner: BudgetOwner) -> None:
        self._rules = rules
        self._owner = owner
        self._cut: IDelayedCall | None = None
        self.held_bytes = 0
        self.transport_bytes = 0
        self.over_since: float | None = None
        self.notice_owed = False
        self.received = 0
        """Bytes this connection sent the node (for the node's choice of whom to pause)."""
        self.received_at_decision = 0

    # --- the decision -----------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        return self.held_bytes + self.transport_bytes

    @property
    def over_budget(self) -> bool:
        return self.over_since is not None

    def may_take_live_copy(self) -> bool:
        """Whether a live msg:N copy may be queued for this receiver now.

        THE one place the node decides it (the routing room and the group fan-out ask
        before every live copy). A receiver at or past its budget is refused, and then
        owes a notice to pull, sent once its queue has drained. A refused copy is
        simply skipped: the message is in its conversation's timeline already, and the
        device catches up from its cursor when it pulls after the notice.
        """
        if self.held_bytes + self.transport_bytes < self._rules.limit:
            return True
        self.notice_owed = True
        return False

    def hold_notice(self) -> bool:
        """Whether a notice to pull should wait for the drain instead of queueing now."""
        if self.over_since is None:
            return False
        self.notice_owed = True
        return True

    # --- the framing's reports (OutboundAccounting) ----------------------------------

    # held and released run for every frame a read makes (four per 1:1 message), so
    # each is one call: the node's count and the budget's checks are inline here.

    def held(self, size: int) -> None:
        held = self.held_bytes = self.held_bytes + size
        rules = self._rules
        node = rules.node
        node.total += size
        if node.total >= node.max_bytes:
            node.over()
        if self.over_since is None and held + self.transport_bytes >= rules.limit:
            self._went_over(rules)

    def released(self, size: int) -> None:
        self.held_bytes -= size
        node = self._rules.node
        node.total -= size
        if node.paused:
            node.maybe_resume()
        if self.over_since is not None:
            self._maybe_back_under()

    def queued(self, size: int) -> None:
        self.transport_bytes += size
        self._grew(size)

    def drained(self) -> None:
        sent = self.transport_bytes
        self.transport_bytes = 0
        self._rules.node.shrank(sent)
        self._maybe_back_under()

    def closed(self) -> None:
        """The connection is gone: its queued bytes no longer count for the node."""
        self._stop_timer()
        self._rules.node.shrank(self.queued_bytes)
        self.held_bytes = self.transport_bytes = 0

    # --- the node's choice of senders to pause ----------------------------------------

    @property
    def received_since_decision(self) -> int:
        return self.received - self.received_at_decision

    def decided(self) -> None:
        self.received_at_decision = self.received

    # ----------------------------------------------------------------------------------

    def _grew(self, size: int) -> None:
        rules = self._rules
        rules.node.grew(size)
        if self.over_since is None and self.held_bytes + self.transport_bytes >= rules.limit:
            self._went_over(rules)

    def _went_over(self, rules: OutboundRules) -> None:
        self.over_since = rules.clock.seconds()
        self._cut = rules.clock.callLater(rules.slow_reader_timeout, self._too_slow)
        self._owner.behind(True)

    def _maybe_back_under(self) -> None:
        # Bytes in the transport only ever leave all at once (the drain), so a
        # receiver that went over stays over until its transport is empty.
        if self.over_since is None or self.queued_bytes >= self._rules.limit:
            return
        self.over_since = None
        self._stop_timer()
        owner = self._owner
        owner.behind(False)
        if self.notice_owed:
            self.notice_owed = False
            owner.pull_notice()

    def _too_slow(self) -> None:
        self._cut = None
        self._owner.cut_slow_reader()

    def _stop_timer(self) -> None:
        cut = self._cut
        self._cut = None
        if cut is not None and cut.active():
            cut.cancel()
