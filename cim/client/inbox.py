"""What a device has of each conversation's timeline, and what it hands its application.

Every conversation is a timeline numbered 1, 2, 3, ... by the node (``Message.seq``, in
``Message.conversation``; docs/protocol.md "Timelines"). The inbox keeps, per
conversation, the device's *watermark*: every message up to it was handed to the
application (or dealt with: the device's own messages, what catch-up skipped). It comes
from the login's summary (a conversation's cursor, or its ``caught_up`` seq) and moves
as messages are handed over in order. Then:

- a live msg:N with ``seq == top + 1`` (``top``: the highest seq handed over) goes to the
  application at once;
- ``seq <= watermark``, a message handed over before (``SeenStore``, which may
  outlive the process: the same id, or the same sender device and ``client_seq``, a
  resend the node took anew), or one this device sent and is still waiting to hear
  about (``sending``: its msg:A died with a node), is a duplicate: dropped
  (its place counts as dealt with), and acknowledged again so the node's cursor is
  where the device is;
- ``seq > top + 1`` is a gap: the message is held and the missing range is fetched with
  HISTORY_R(after=top, before=seq) (``fill``); the answer is handed over oldest first,
  then the held message and whatever follows it. A gap of more than one page is
  brought by the conversation's catch-up instead (``pull``), which hands the whole
  range over in order and then the held messages. A fill refused for now (the node's
  database is down: UNAVAILABLE, or no answer through its retries) hands the gap to the
  conversation's catch-up the same way, the held messages still held, so a short outage
  delays the conversation and keeps its order. After ``MAX_REFUSED_ROUNDS`` such tries,
  or a refusal that will not change, the held messages are handed over anyway, in
  order, with the watermark left below the hole, and the conversation's catch-up is
  asked for, which brings the missing ones once the node can (acknowledging never
  claims them). A fill cut by a lost connection keeps them held for the next login's
  catch-up, which brings the hole and then releases them in order. A later fill answers
  only its own range: it moves the watermark only when no older hole is open below it
  (``_Timeline.filled``).

Nothing waits for a fixed window that gives up: a gap is held exactly as long as its
fill takes, and only its own conversation waits; other conversations flow.

While a conversation is being caught up (``begin_catch_up`` .. ``end_catch_up``), or the
login's summary is on its way, a live message after a gap waits for the catch-up rather
than a fill of its own: the pull brings the same range. A fill already asked that is
answered (or fails) once the pull has begun is set aside for the same reason.
Catch-up pages come newest first; each is handed over oldest first within itself
(``catch_up_page``), and the watermark moves once the pages below have come too
(``end_catch_up``).

A conversation without a watermark holds its live messages until the node says where
the device starts: the login's summary (one request, with its deadline and retries),
or, for a group the summary did not name (joined since), that conversation's pull
(``unknown``), which brings every message past the member's start. A 1:1 conversation
the summary did not name starts at 0. If no summary can say (it failed, or said
``more`` without naming it), messages go at once, deduplicated by id, and are
acknowledged with ``through_seq`` 0, which moves no cursor.

Each hand-over calls ``deliver``; returning False declines the message: it is not
acknowledged and the watermark stops below it (so the node keeps it for the next
catch-up). After ``close`` nothing more is handed over or acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.client.answers import RETRYABLE, RequestFailed, RequestRefused, RequestTimedOut
from cim.client.seen import SeenStore
from cim.protocols import cim_pb2

__all__ = ["Inbox"]

DIRECT_PREFIX = "d:"
"""Conversation keys of 1:1 timelines start with this (groups' with "g:")."""

MAX_REFUSED_ROUNDS = 6
"""Tries in a row to bring one gap that the node refused for now (each fill, and each
catch-up it handed the gap to, with its own retries: about 3 s each) before the
messages held behind it are shown without it. Order is kept through an outage of
about 20 s; a longer one holds a conversation back no longer than that."""

MAX_MARKED_RANGE = 4096
"""Seqs a gap fill may mark dealt with above an open hole (``_Timeline.filled``): a
fill is one page, so only rows removed in between make its range wider."""

Acknowledge = Callable[[cim_pb2.Message, int], None]
"""ack:R for a handed-over live message: (message, through_seq)."""

Fill = Callable[[str, str, str, int, int], "Deferred[cim_pb2.HistoryA]"]
"""HISTORY_R for a gap: (conversation, peer, group, after, before) -> its answer."""


@dataclass(eq=False)
class _Timeline:
    key: str
    watermark: int | None = None
    top: int = 0
    above: set[int] = field(default_factory=set)
    """Seqs above the watermark already handed over (or dealt with)."""
    held: dict[int, cim_pb2.Message] = field(default_factory=dict)
    own: set[int] = field(default_factory=set)
    """Held places of this device's own messages (msg:A): dealt with, never handed over."""
    declined: bool = False
    filling: bool = False
    refused_rounds: int = 0
    """Tries in a row to bring the open gap that ended without it: a fill refused for
    now, or the catch-up it was handed to ending incomplete (``MAX_REFUSED_ROUNDS``)."""
    catching_up: bool = False
    peer: str = ""
    group: str = ""

    def advance(self) -> None:
        if self.watermark is None:
            return
        while self.watermark + 1 in self.above:
            self.watermark += 1
            self.above.discard(self.watermark)
        self.top = max(self.top, self.watermark)

    def dealt_with(self, seq: int) -> None:
        """``seq`` needs nothing more (shown before, or the device's own)."""
        if self.watermark is None or seq > self.watermark:
            self.above.add(seq)
            self.top = max(self.top, seq)
            self.advance()

    def skip_to(self, seq: int) -> None:
        """Everything up to ``seq`` is dealt with (a cursor, a skipped old part)."""
        if self.watermark is None or seq > self.watermark:
            self.watermark = seq
            self.above = {s for s in self.above if s > seq}
        self.top = max(self.top, seq)
        self.advance()

    def filled(self, after: int, before: int) -> None:
        """A gap fill brought everything the node has in ``after < seq < before``.

        That says nothing of the seqs at or below ``after``: when a hole is open below
        it (an earlier fill failed, and what came after was shown), the range is only
        marked dealt with, and the watermark stays below the hole, so acknowledging
        never claims it and the next catch-up brings it. Skipping to ``before - 1``
        there lost the hole's messages for good (the chaos run's group loss,
        docs/reliability.md). A range too wide to mark (rows purged in between) only
        moves ``top``: the next catch-up settles it.
        """
        if self.watermark is None or self.watermark >= after:
            self.skip_to(before - 1)
            return
        if before - after - 1 <= MAX_MARKED_RANGE:
            self.above.update(range(after + 1, before))
        self.top = max(self.top, before - 1)
        self.advance()


class Inbox:
    """Per-conversation watermarks between the connection and the application."""

    log = Logger()

    def __init__(
        self,
        user: str,
        seen: SeenStore,
        deliver: Callable[[cim_pb2.Message], object],
        acknowledge: Acknowledge,
        fill: Fill,
        pull: Callable[[str], object] = lambda conversation: None,
        sending: Callable[[cim_pb2.Message], bool] = lambda message: False,
    ) -> None:
        self.user = user
        self._sending = sending
        self.seen = seen
        self._deliver = deliver
        self._acknowledge = acknowledge
        self._fill = fill
        self._pull = pull
        """Start the catch-up of one conversation (it brings what is past the cursor)."""
        self._timelines: dict[str, _Timeline] = {}
        self.summary_pending = False
        """The login's summary is on its way: conversations without a watermark wait."""
        self.summary_complete = False
        """A summary named every conversation of the device: others are new."""
        self.duplicates = 0
        self.closed = False

    # --- what the application may ask -------------------------------------------------

    def watermark(self, conversation: str) -> int | None:
        timeline = self._timelines.get(conversation)
        return timeline.watermark if timeline is not None else None

    def held(self, conversation: str | None = None) -> int:
        if conversation is not None:
            timeline = self._timelines.get(conversation)
            return len(timeline.held) if timeline is not None else 0
        return sum(len(timeline.held) for timeline in self._timelines.values())

    def close(self) -> None:
        """Hand over nothing more; what is held stays unacknowledged (the node keeps it)."""
        self.closed = True
        for timeline in self._timelines.values():
            timeline.held.clear()

    # --- the summary ------------------------------------------------------------------

    def anchor(self, conversation: str, seq: int, peer: str = "", group: str = "") -> None:
        """The node says the device has dealt with ``conversation`` up to ``seq``."""
        timeline = self._timeline(conversation)
        timeline.peer = peer or timeline.peer
        timeline.group = group or timeline.group
        timeline.skip_to(seq)
        self._drain(timeline)

    # --- live messages ----------------------------------------------------------------

    def receive(self, message: cim_pb2.Message) -> None:
        """A live msg:N from the node."""
        if self.closed:
            return  # unacknowledged: the node keeps it
        if not message.conversation or not message.seq:
            self._receive_unnumbered(message)
            return
        timeline = self._timeline(message.conversation)
        self._learn(timeline, message)
        seq = message.seq
        if self._waits_for_its_start(timeline):
            if self._is_duplicate(timeline, message):
                self.duplicates += 1
            else:
                timeline.held.setdefault(seq, message)
            return
        if self._is_duplicate(timeline, message):
            self.duplicates += 1
            timeline.dealt_with(seq)
            self._ack(message, timeline)
            self._drain(timeline)
            return
        if seq in timeline.held:
            self.duplicates += 1
            return
        if timeline.watermark is None or seq <= timeline.top + 1:
            self._hand_over(timeline, message, live=True)
            self._drain(timeline)
            return
        timeline.held[seq] = message
        self._fill_gap(timeline)

    def own(self, conversation: str, seq: int) -> None:
        """msg:A: this device's own message sits at ``seq`` (dealt with, not handed over)."""
        if self.closed or not conversation or not seq:
            return
        timeline = self._timeline(conversation)
        if self._waits_for_its_start(timeline):
            timeline.own.add(seq)
            timeline.held[seq] = cim_pb2.Message(conversation=conversation, seq=seq)
            return
        if timeline.watermark is None or seq <= timeline.watermark:
            return
        if seq <= timeline.top + 1:
            timeline.above.add(seq)
            timeline.top = max(timeline.top, seq)
            timeline.advance()
            self._drain(timeline)
            return
        timeline.own.add(seq)
        timeline.held[seq] = cim_pb2.Message(conversation=conversation, seq=seq)
        self._fill_gap(timeline)

    def _waits_for_its_start(self, timeline: _Timeline) -> bool:
        """Whether a conversation without a watermark holds its messages until the node
        says where the device starts (True), or hands them over at once (False).

        While the summary is on its way, or the conversation's pull is, they wait. After
        a complete summary that did not name it, the conversation is new to the device:
        a 1:1 one starts at its beginning (0); a group one (joined since) is pulled, as
        the node knows where the member starts. Without a summary (it failed, or said
        ``more``), nothing will say: messages go at once, acknowledged with
        ``through_seq`` 0.
        """
        if timeline.watermark is not None:
            return False
        if self.summary_pending or timeline.catching_up:
            return True
        if not self.summary_complete:
            return False
        if timeline.key.startswith(DIRECT_PREFIX):
            timeline.skip_to(0)
            return False
        self._pull_instead(timeline)
        return True

    def summary_done(self, complete: bool) -> None:
        """The summary anchored what it named (or failed): release what waited for it."""
        self.summary_pending = False
        self.summary_complete = self.summary_complete or complete
        for timeline in list(self._timelines.values()):
            if not timeline.held or self.closed or self._waits_for_its_start(timeline):
                continue
            if timeline.watermark is not None:
                self._drain(timeline)
                continue
            for seq in sorted(timeline.held):  # unanchored: in seq order, at once
                message = timeline.held.pop(seq)
                if seq in timeline.own:
                    timeline.own.discard(seq)
                elif not self._is_duplicate(timeline, message):
                    self._hand_over(timeline, message, live=True)

    def _receive_unnumbered(self, message: cim_pb2.Message) -> None:
        """A message without a timeline place (a release-1 node): dedup by id only."""
        if self.seen.is_duplicate(message.id, getattr(message, "from"), message.device, 0):
            self.duplicates += 1
            self._acknowledge(message, 0)
            return
        if self._give(message):
            self._acknowledge(message, 0)

    # --- catch-up ---------------------------------------------------------------------

    def begin_catch_up(
        self, conversation: str, cursor: int, peer: str = "", group: str = ""
    ) -> None:
        """Pages of ``conversation`` past ``cursor`` are coming: live gaps wait for them."""
        self.anchor(conversation, cursor, peer, group)
        self._timelines[conversation].catching_up = True

    def catch_up_page(self, conversation: str, messages: Iterable[cim_pb2.Message]) -> int:
        """Hand over caught-up messages (oldest first); how many reached the application."""
        timeline = self._timeline(conversation)
        handed = 0
        for message in sorted(messages, key=lambda m: m.seq):
            if self.closed:
                break
            self._learn(timeline, message)
            if message.seq in timeline.own:  # this device's own (msg:A): not shown back
                timeline.own.discard(message.seq)
                timeline.held.pop(message.seq, None)
                timeline.dealt_with(message.seq)
                continue
            if self._is_duplicate(timeline, message):
                self.duplicates += 1
                timeline.dealt_with(message.seq)  # shown before (live)
                continue
            timeline.held.pop(message.seq, None)
            if self._hand_over(timeline, message, live=False):
                handed += 1
        timeline.advance()
        return handed

    def end_catch_up(self, conversation: str, through: int, complete: bool) -> int:
        """The pull of ``conversation`` ended; ``complete``: every page up to ``through``
        was handed over. Returns the watermark (the cursor to acknowledge)."""
        timeline = self._timeline(conversation)
        timeline.catching_up = False
        if complete and not timeline.declined and not self.closed:
            timeline.refused_rounds = 0
            timeline.skip_to(through)
        elif timeline.held:
            timeline.refused_rounds += 1
        timeline.advance()
        self._drain(timeline)
        return timeline.watermark or 0

    # --- hand-over --------------------------------------------------------------------

    def _is_duplicate(self, timeline: _Timeline, message: cim_pb2.Message) -> bool:
        if timeline.watermark is not None and message.seq <= timeline.watermark:
            return True
        if message.seq in timeline.above:
            return True
        if self._sending(message):
            # This device's own message, still waiting for its answer: usually msg:A
            # says where it sits (``own``), but when the node died before answering, a
            # pull can bring it before the resend's msg:A does.
            return True
        sender = getattr(message, "from")
        # By id, and by the sender device's number: a resend the node took anew (past
        # its dedup window) has a new id and a new seq, but the same client_seq.
        return self.seen.is_duplicate(message.id, sender, message.device, message.client_seq)

    def _hand_over(self, timeline: _Timeline, message: cim_pb2.Message, live: bool) -> bool:
        """Give one message to the application; True if it took it."""
        if not self._give(message):
            timeline.declined = True
            return False
        timeline.above.add(message.seq)
        timeline.top = max(timeline.top, message.seq)
        if not timeline.declined:
            timeline.advance()
        if live:
            self._ack(message, timeline)
        return True

    def _give(self, message: cim_pb2.Message) -> bool:
        if self.closed:
            return False
        sender = getattr(message, "from")
        # Recorded first: if the process dies inside on_message, the message is not
        # acknowledged, so it comes again and is not shown twice. A store that cannot
        # write (disk full) weakens dedup; it must not lose the message.
        try:
            self.seen.record(message.id, sender, message.device, message.client_seq)
        except Exception:
            self.log.failure("could not remember message {id}", id=message.id)
        try:
            taken = self._deliver(message)
        except Exception:
            self.log.failure("on_message raised for message {id}", id=message.id)
            taken = True
        return taken is not False

    def _ack(self, message: cim_pb2.Message, timeline: _Timeline) -> None:
        """ack:R for a message handed over (even the one being handed over as the
        application closes the inbox) or a repeated one."""
        through = 0 if timeline.declined else (timeline.watermark or 0)
        try:
            self._acknowledge(message, through)
        except Exception:
            self.log.failure("could not acknowledge message {id}", id=message.id)

    def _drain(self, timeline: _Timeline) -> None:
        """Hand over the held messages that now follow on (or are duplicates)."""
        while timeline.held and not self.closed:
            seq = min(timeline.held)
            if timeline.watermark is not None and seq <= timeline.watermark:
                timeline.held.pop(seq)
                timeline.own.discard(seq)
                continue
            if seq > timeline.top + 1:
                break
            message = timeline.held.pop(seq)
            if seq in timeline.own:
                timeline.own.discard(seq)
                timeline.above.add(seq)
                timeline.top = max(timeline.top, seq)
                timeline.advance()
            elif self._is_duplicate(timeline, message):
                timeline.dealt_with(seq)
            else:
                self._hand_over(timeline, message, live=True)
        if timeline.held and not self.closed:
            self._fill_gap(timeline)

    # --- gaps -------------------------------------------------------------------------

    def _fill_gap(self, timeline: _Timeline) -> None:
        if timeline.filling or timeline.catching_up or not timeline.held:
            return
        if self.summary_pending:
            # The summary on its way says where the device is, and its pull brings the
            # gap; a fill answered first would skip part of it (``_filled``). Once the
            # summary is in, ``summary_done`` drains this timeline again.
            return
        after, before = timeline.top, min(timeline.held)
        if before <= after + 1:
            self._drain(timeline)
            return
        timeline.filling = True
        asked = self._fill(timeline.key, timeline.peer, timeline.group, after, before)
        asked.addCallback(self._filled, timeline, after, before)
        asked.addErrback(self._fill_failed, timeline)

    def _filled(
        self, answer: cim_pb2.HistoryA, timeline: _Timeline, after: int, before: int
    ) -> None:
        timeline.filling = False
        if timeline.catching_up:
            # The conversation's pull began meanwhile: it brings this range, in order,
            # and its end hands the held messages over. Used here, a fill of more than a
            # page would move the watermark past messages the pull then takes for shown.
            return
        if answer.error:
            self._fill_failed(Failure(ValueError(answer.message or answer.error)), timeline)
            return
        timeline.refused_rounds = 0
        page = [m for m in answer.messages if after < m.seq < before]
        if page and answer.more:
            # More than one page missing: the conversation's catch-up brings all of it,
            # page by page from the cursor, and then the held messages, in order. The
            # application is never handed a part and the rest skipped.
            self._pull_instead(timeline)
            return
        for message in sorted(page, key=lambda m: m.seq):
            if self.closed:
                return
            self._learn(timeline, message)
            if self._is_duplicate(timeline, message):
                timeline.dealt_with(message.seq)
                continue
            self._hand_over(timeline, message, live=True)
        # The node gave everything it has between ``after`` and the held message.
        if not timeline.declined:
            timeline.filled(after, before)
        else:
            timeline.top = max(timeline.top, before - 1)
        self._drain(timeline)

    def _fill_failed(self, failure: Failure, timeline: _Timeline) -> None:
        timeline.filling = False
        if timeline.catching_up:
            return  # the pull brings the hole, then the held messages, in order
        if failure.check(RequestFailed, ValueError) is None:
            # The connection went: the held messages wait for the next login's catch-up,
            # which brings the missing ones too (the cursor is below them).
            self.log.info(
                "gap fill in {conversation} interrupted: {why}",
                conversation=timeline.key,
                why=failure.getErrorMessage(),
            )
            return
        if _for_now(failure) and timeline.refused_rounds < MAX_REFUSED_ROUNDS:
            # The node cannot read now: its catch-up of the conversation (retried with
            # its backoff) brings the gap and then what is held, in order.
            timeline.refused_rounds += 1
            self.log.info(
                "gap fill in {conversation} refused for now ({why}); its catch-up brings it",
                conversation=timeline.key,
                why=failure.getErrorMessage(),
            )
            self._pull_instead(timeline)
            return
        timeline.refused_rounds = 0
        self.log.info(
            "could not fill a gap in {conversation}: {why}; showing what came",
            conversation=timeline.key,
            why=failure.getErrorMessage(),
        )
        # Hand the held ones over in order; the watermark stays below the hole, so the
        # conversation's catch-up brings the missing messages: asked now (it retries
        # with its backoff while the node refuses), not left to the next login, which
        # on a steady connection may be days away with the cursor held below the hole.
        for seq in sorted(timeline.held):
            if self.closed:
                return
            message = timeline.held.pop(seq)
            if seq in timeline.own:
                timeline.own.discard(seq)
                timeline.dealt_with(seq)  # not shown back; past the hole all the same
                continue
            if not self._is_duplicate(timeline, message):
                self._hand_over(timeline, message, live=True)
        if timeline.watermark is not None and timeline.watermark < timeline.top:
            self._pull(timeline.key)

    def _pull_instead(self, timeline: _Timeline) -> None:
        """The conversation's catch-up brings the gap, then what is held, in order;
        live messages after a gap wait for it meanwhile (``catching_up``)."""
        timeline.catching_up = True
        self._pull(timeline.key)

    # --- bookkeeping ------------------------------------------------------------------

    def _timeline(self, conversation: str) -> _Timeline:
        timeline = self._timelines.get(conversation)
        if timeline is None:
            timeline = self._timelines[conversation] = _Timeline(conversation)
        return timeline

    def _learn(self, timeline: _Timeline, message: cim_pb2.Message) -> None:
        """Where a gap of this conversation is fetched from (HISTORY_R's peer or group)."""
        if message.group:
            timeline.group = message.group
        elif not timeline.peer:
            sender = getattr(message, "from")
            timeline.peer = message.to if sender == self.user else sender


def _for_now(failure: Failure) -> bool:
    """Whether a fill's failure may pass (the node's "not now", or no answer), rather
    than one a retry cannot change (not a participant, a bad request)."""
    error = failure.value
    if isinstance(error, RequestTimedOut):
        return True
    return isinstance(error, RequestRefused) and error.code in RETRYABLE
