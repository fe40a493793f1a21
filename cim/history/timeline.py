"""Conversations' timelines: every message once, numbered in its durable write (#14).

``Timelines.append`` is the one write of a message: the node promises nothing (msg:A,
ack:N "stored" or "accepted") before it fires. Appends are group-committed through the
one batch writer (``cim.backends.batching.BatchWriter``): one transaction per batch,
which numbers each conversation's new messages under its row lock
(``cim.storage.timeline.append_txn``).

A database that cannot take an append is said at once, never waited out: the
Deferred of every message in a failed write fails with ``TimelineUnavailable`` (the
sender is refused with UNAVAILABLE and resends), and while writes fail new appends are
refused before they are queued. The writer keeps retrying what it holds; if such a
batch commits later, the sender's resend finds it again (by id or by its client
sequence) instead of appending it twice.

Cursor moves from ack:R are batched too (many per transaction, each only forward);
catch-up reads and the retention purge go straight to the database.

On the embedded SQLite database (a ``journal`` directory given), appends are numbered
in memory and journaled instead (``cim.history.journal``): promised once the journal
file has them, copied into SQLite in large batches. Every read of the timelines (and
the cursor moves, which check a seq) then waits first for what was promised before it
(``settled``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy.exc import DataError, IntegrityError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.backends.batching import BatchWriter
from cim.config import CimConfig
from cim.history.answers import Answer, Then
from cim.history.journal import Journal
from cim.history.store import direct_conversation, group_conversation
from cim.history.unavailable import TimelineUnavailable
from cim.protocols import cim_pb2
from cim.protocols.held_writes import Later
from cim.storage.changes import ChangeAsked, ChangeMade, change_txn
from cim.storage.database import Database
from cim.storage.schema import DEVICE_MAX, GROUP_ID_LENGTH, USER_NAME_MAX
from cim.storage.timeline import (
    Appended,
    ConversationState,
    CursorMove,
    NewMessage,
    TimelinePage,
    append_txn,
    enrol_and_move_txn,
    move_cursors_txn,
)
from cim.storage.timeline_reads import (
    conversation_page_txn,
    purge_timeline_txn,
    summary_txn,
    unread_page_txn,
)

__all__ = [
    "TimelineSettings",
    "TimelineUnavailable",
    "Timelines",
    "timeline_settings",
    "untimelineable",
]

P = ParamSpec("P")
R = TypeVar("R")

_MAX_ID = (1 << 63) - 1
_PERMANENT = (ValueError, DataError, IntegrityError)
RETRY = Backoff(0.2, 10.0)
BEHIND_RETRY = 1.0
"""Seconds a sender is asked to wait while the timeline writer catches up."""

_log = Logger(namespace="cim.timeline")

_NewMessageFields = tuple[str, int, str, str, int, float, bytes, tuple[tuple[str, str], ...]]
_new_message: Callable[[_NewMessageFields], NewMessage] = partial(tuple.__new__, NewMessage)
"""``NewMessage`` by tuple's own constructor: every message makes one, and the named
tuple's generated ``__new__`` is a Python call (docs/benchmarks.md)."""


def untimelineable(
    msg_id: int, sender: str, to: str, group: str, sender_device: str, client_seq: int
) -> str | None:
    """Why the timeline could never hold a message of these fields, or None if it can
    (the fields, not the message: ``Timelines.take`` reads each once)."""
    if not 0 < msg_id <= _MAX_ID:
        return f"message id {msg_id} is not a server message id"
    if not sender or not (group or to):
        return "the message has no sender, or neither a receiver nor a group"
    if len(sender) > USER_NAME_MAX or len(to) > USER_NAME_MAX:
        return "a user name is longer than the database allows"
    if len(group) > GROUP_ID_LENGTH or len(sender_device) > DEVICE_MAX:
        return "the group id or device name is longer than the database allows"
    if client_seq > _MAX_ID:
        return "client_seq is 2**63 or more"
    return None


@dataclass(frozen=True)
class TimelineSettings:
    """From ``[offline]`` (the group commit) and ``[archive]`` (backlog, retention)."""

    batch_size: int = 200
    batch_wait: float = 0.0
    max_backlog: int = 50_000
    dedup_window: float = 600.0
    retention_days: float | None = None
    purge_interval: float = 3600.0
    purge_batch: int = 1000


def timeline_settings(config: CimConfig) -> TimelineSettings:
    """``[offline] batch_size``/``batch_wait`` group-commit the appends; ``[archive]
    max_buffer`` bounds what waits, ``retention_days``/``purge_*`` purge old messages;
    ``[state] dedup_window`` is how far back a resend is looked for."""
    return TimelineSettings(
        batch_size=config.offline.batch_size,
        batch_wait=config.offline.batch_wait,
        max_backlog=config.archive.max_buffer,
        dedup_window=config.state.dedup_window,
        retention_days=config.retention_days,
        purge_interval=config.archive.purge_interval,
        purge_batch=config.archive.purge_batch,
    )


@dataclass(eq=False)
class _Append:
    message: NewMessage
    answer: Answer


def _run_now(work: Callable[[], object]) -> object:
    return work()


@dataclass(eq=False, slots=True)
class _Move:
    """A cursor move waiting for its batch; raised in place until the batch takes it."""

    key: tuple[str, str, str]
    seq: int


@dataclass(frozen=True, slots=True)
class _Enrol:
    """A device that connected, waiting for its batch: enrolled before the batch's
    cursor moves (``enrol_and_move_txn``), as before any of its own."""

    user: str
    device: str


class Timelines:
    """The node's timelines: appends, cursor moves, catch-up and history reads."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        settings: TimelineSettings = TimelineSettings(),
        journal: str | None = None,
    ) -> None:
        """``journal``: the directory of the journal (the SQLite database's, see
        ``cim.history.journal.journal_directory``); None: numbered in SQL."""
        self._db = db
        self._clock = clock
        self.settings = settings
        self.counts: Counter[str] = Counter()
        self._failing = False
        self._behind = False
        self._stopping = False
        self._appends: BatchWriter[_Append] = BatchWriter(
            clock,
            self._write,
            name="timeline",
            log=_log,
            batch_size=settings.batch_size,
            batch_wait=settings.batch_wait,
            retry=RETRY,
            permanent=_PERMANENT,
            on_written=self._written,
            on_failure=self._write_failed,
            on_rejected=self._rejected,
            on_abandoned=self._abandoned,
        )
        self._answer_scope: Callable[[Callable[[], object]], object] = _run_now
        self.journal: Journal | None = None
        if journal is not None:
            self.journal = Journal(
                db, clock, journal, dedup_window=settings.dedup_window, counts=self.counts
            )
        self._moves: dict[tuple[str, str, str], _Move] = {}
        """Cursor moves not yet taken by a batch, by (user, device, conversation): a
        later ack of the same conversation raises the waiting move instead of adding
        one (a busy pair acknowledges every message; the batch needs the last)."""
        self._cursors: BatchWriter[_Move | _Enrol] = BatchWriter(
            clock,
            self._write_moves,
            name="cursors",
            log=_log,
            batch_size=settings.batch_size,
            batch_wait=max(settings.batch_wait, 0.05),
            retry=RETRY,
            permanent=_PERMANENT,
        )
        self._purge: LoopingCall | None = None

    # --- lifecycle --------------------------------------------------------------------

    def answer_in(
        self,
        scope: Callable[[Callable[[], object]], object],
        at_read_end: Later | None = None,
        after_flush: Later | None = None,
    ) -> None:
        """Answer appends (a batch's, a journal turn's) inside ``scope``: the IM
        listener's ``HeldWrites.around``, so the msg:A, msg:N and ack:N frames that many
        answers make for one connection leave in one send, as those made during a read
        do (``cim.protocols.wire``). With ``at_read_end`` (``HeldWrites.at_read_end``)
        the journal writes what a read numbered as that read ends, not a reactor turn
        later: at a paced rate a turn holds several reads, and each message's answers
        waited for all of them (docs/benchmarks.md). With ``after_flush``
        (``HeldWrites.after_flush``) the journal hands a turn's rows to its copy once
        the answers' frames have left."""
        self._answer_scope = scope
        if self.journal is not None:
            self.journal.answer_scope = scope
            if at_read_end is not None:
                self.journal.at_read_end = at_read_end
            if after_flush is not None:
                self.journal.after_flush = after_flush

    def start(self) -> Deferred[None]:
        """Replay the journal (when there is one) before anything is taken."""
        d = self.journal.start() if self.journal is not None else succeed(None)
        return d.addCallback(lambda _: self._start_purge())

    def _start_purge(self) -> None:
        if self.settings.purge_interval and self.settings.retention_days is not None:
            self._purge = LoopingCall(self.purge)
            self._purge.clock = self._clock
            self._purge.start(self.settings.purge_interval, now=True)

    def stop(self) -> Deferred[None]:
        """Write what is taken (one attempt) before the database stops."""
        self._stopping = True
        if self._purge is not None and self._purge.running:
            self._purge.stop()
        self._purge = None

        async def drain() -> None:
            await self._appends.stop(flush=True)
            if self.journal is not None:
                await self.journal.stop()
            await self._cursors.stop(flush=True)

        return Deferred.fromCoroutine(drain())

    # --- appending --------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages taken and not yet committed."""
        if self.journal is not None:
            return self.journal.unwritten
        return self._appends.pending

    @property
    def waiting(self) -> int:
        """The node's backpressure: messages taken and not yet promised (with a
        journal, and its copies' backlog past one batch: ``Journal.waiting``)."""
        if self.journal is not None:
            return self.journal.waiting
        return self._appends.pending

    def settled(self, *, hurry: bool = True) -> Deferred[None]:
        """Fires once every message promised so far is in the database: what a read
        that must see them waits for (at once without a journal). ``hurry``: see
        ``Journal.settled``."""
        if self.journal is None:
            return succeed(None)
        return self.journal.settled(hurry=hurry)

    def _read(
        self, txn: Callable[Concatenate[Any, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[R]:
        """``Database.run`` after ``settled``: the one way the timelines are read."""
        if self.journal is None:
            return self._db.run(txn, *args, **kwargs)
        d = self.journal.settled()
        return d.addCallback(lambda _: self._db.run(txn, *args, **kwargs))

    def behind(self) -> float:
        """Seconds new messages should wait (the writer holds ``max_backlog`` or its
        writes fail); 0.0 while it keeps up."""
        journal = self.journal
        if self._failing or (journal is not None and journal.broken):
            return BEHIND_RETRY
        waiting = journal.unwritten if journal is not None else self._appends.pending
        if self._behind:
            if waiting >= self.settings.max_backlog // 2:
                return BEHIND_RETRY
            self._behind = False
            return 0.0
        if waiting < self.settings.max_backlog:
            return 0.0
        self._behind = True
        self.counts["behind"] += 1
        return BEHIND_RETRY

    def append(self, message: cim_pb2.Message, sender_device: str) -> Deferred[Appended]:
        """Append a taken message; fires once it is durable, with its seq (and the
        first id when it is a resend of one appended before)."""
        answer: Deferred[Appended] = Deferred()
        self.take(message, sender_device, answer)
        return answer

    def append_then(
        self,
        message: cim_pb2.Message,
        sender_device: str,
        done: Callable[..., object],
        failed: Callable[..., object],
        *args: Any,
    ) -> None:
        """``append``, answered by ``done(appended, *args)`` or ``failed(failure,
        *args)`` without a Deferred (``cim.history.answers``)."""
        self.take(message, sender_device, Then(done, failed, args))

    def take(self, message: cim_pb2.Message, sender_device: str, answer: Answer) -> None:
        if self._failing or self._stopping:
            answer.errback(TimelineUnavailable("the timeline cannot be written now"))
            return
        sender = getattr(message, "from")
        to = message.to
        group = message.group
        msg_id = message.id
        client_seq = message.client_seq
        reason = untimelineable(msg_id, sender, to, group, sender_device, client_seq)
        if reason is not None:
            answer.errback(ValueError(reason))
            return
        readers: tuple[tuple[str, str], ...] = ()
        if group:
            conversation = group_conversation(group)
        else:
            # "@system" (cim.im.system) reads nothing: only people get a reader row.
            conversation = direct_conversation(sender, to)
            if sender[:1] == "@":
                readers = () if to[:1] == "@" else ((to, sender),)
            elif to[:1] == "@":
                readers = ((sender, to),)
            else:
                readers = ((sender, to), (to, sender))
        sent_ms = message.sent_at_ms or 0
        new = _new_message(
            (
                conversation,
                msg_id,
                sender,
                sender_device,
                client_seq,
                sent_ms / 1000.0,
                message.SerializeToString(),  # no map field: the same bytes either way
                readers,
            )
        )
        if self.journal is not None:
            self.journal.take(new, answer)
            return
        # The answer says how it ended; the writer's own Deferred would add nothing.
        self._appends.put(_Append(new, answer))

    def _write(self, batch: list[_Append]) -> Deferred[int]:
        since = self._clock.seconds() - self.settings.dedup_window
        d = self._db.run(append_txn, [entry.message for entry in batch], since)

        def placed(where: dict[int, Appended]) -> int:
            def answer() -> None:
                for entry in batch:
                    if not entry.answer.called:
                        entry.answer.callback(where[entry.message.msg_id])

            self._answer_scope(answer)
            return sum(1 for appended in where.values() if appended.new)

        return d.addCallback(placed)

    def _written(self, batch: list[_Append], new_rows: int) -> None:
        self.counts["appended"] += new_rows
        if self._failing:
            self._failing = False
            _log.info("timeline: appends work again")

    def _write_failed(self, batch: list[_Append], failure: Failure) -> None:
        self.counts["write_failed"] += 1
        if failure.check(*_PERMANENT):
            return  # the batch is split to find the one message at fault
        self._failing = True
        for entry in batch:
            if not entry.answer.called:
                entry.answer.errback(TimelineUnavailable(failure.getErrorMessage()))

    def _rejected(self, entry: _Append, failure: Failure) -> None:
        self.counts["rejected"] += 1
        _log.error(
            "timeline: message {id} cannot be appended: {why}",
            id=entry.message.msg_id,
            why=failure.getErrorMessage(),
        )
        if not entry.answer.called:
            entry.answer.errback(failure)

    def _abandoned(self, batch: list[_Append], failure: Failure) -> None:
        lost = [entry for entry in batch if not entry.answer.called]
        for entry in lost:
            entry.answer.errback(TimelineUnavailable("the node stopped before the write"))
        if lost:
            _log.error(
                "timeline: {count} messages were not written at shutdown ({why}); their "
                "senders were refused and resend them",
                count=len(lost),
                why=failure.getErrorMessage(),
            )

    # --- cursors ----------------------------------------------------------------------

    def move_cursor(self, user: str, device: str, conversation: str, seq: int) -> None:
        """ack:R: the device has every message of the conversation through ``seq``
        (batched; a lost move only means those messages are offered again)."""
        if seq <= 0 or not conversation:
            return
        seq = min(seq, _MAX_ID)
        key = (user, device, conversation)
        waiting = self._moves.get(key)
        if waiting is not None:
            if seq > waiting.seq:
                waiting.seq = seq
            return
        move = self._moves[key] = _Move(key, seq)
        self._cursors.put(move)

    def _write_moves(self, entries: list[_Move | _Enrol]) -> Deferred[int]:
        """One batch of enrolments and cursor moves: taken now (a later ack adds a new
        move), written once the copies reach what was promised, at their pace (no copy
        of its own)."""
        enrolments: list[tuple[str, str]] = []
        rows: list[CursorMove] = []
        for entry in entries:
            if isinstance(entry, _Enrol):
                enrolments.append((entry.user, entry.device))
                continue
            if self._moves.get(entry.key) is entry:
                del self._moves[entry.key]
            rows.append(CursorMove(*entry.key, entry.seq))
        d = self.settled(hurry=False)
        return d.addCallback(lambda _: self._db.run(enrol_and_move_txn, enrolments, rows))

    def move_cursors(
        self, user: str, device: str, marks: Sequence[cim_pb2.Cursor]
    ) -> Deferred[int]:
        """OFFLINE_R.acks, OFFLINE_ACK_R: fires with how many moved."""
        moves = [
            CursorMove(user, device, mark.conversation, min(mark.seq, _MAX_ID))
            for mark in marks
            if mark.conversation and mark.seq
        ]
        if not moves:
            return succeed(0)
        return self._read(move_cursors_txn, moves)

    # --- recall and edit ---------------------------------------------------------------

    def change(self, asked: ChangeAsked) -> Deferred[ChangeMade]:
        """CHANGE_R (cim.storage.changes): its own transaction, not the appends' batch
        (rare, and its checks must see the row as the entry is written); fails with
        ``ChangeRefused`` when the change cannot be made, and changes nothing then."""
        if self._stopping:
            return fail(TimelineUnavailable("the timeline cannot be written now"))
        journal = self.journal
        if journal is None:
            return self._db.run(change_txn, asked)

        async def change() -> ChangeMade:
            made = await self._db.run(change_txn, asked)
            journal.numbered(made.appended.conversation, made.appended.seq)
            return made

        # Its entry is numbered in SQL: the journal's numbering waits meanwhile.
        return journal.exclusive(change)

    def enrol_device(self, user: str, device: str) -> Deferred[None]:
        """A device connected: one new to the account starts at the present
        (``enrol_device_txn``; its catch-up reads enrol it too, whichever comes first).

        Batched with the cursor moves, in one transaction per batch: a storm of logins
        is a few transactions, not one each. Each waited on the database thread
        before, and that thread runs below the reactor (``cim.backends.threads``), so
        a storm queued thousands of them at once, whose memory the process kept."""
        return self._cursors.add(_Enrol(user, device))

    # --- reading ----------------------------------------------------------------------

    def summary(self, user: str, device: str) -> Deferred[list[ConversationState]]:
        return self._read(summary_txn, user, device)

    def unread_page(
        self,
        user: str,
        device: str,
        conversation: str,
        before: int | None,
        limit: int,
        max_bytes: int,
    ) -> Deferred[TimelinePage]:
        return self._read(
            unread_page_txn, user, device, conversation or None, before, limit, max_bytes
        )

    def conversation_page(
        self, conversation: str, before: int | None, after: int, limit: int, max_bytes: int
    ) -> Deferred[TimelinePage]:
        return self._read(conversation_page_txn, conversation, before, after, limit, max_bytes)

    # --- retention --------------------------------------------------------------------

    def purge(self) -> Deferred[None]:
        """One pass of ``[archive] retention_days``: batches of ``purge_batch`` rows."""
        days = self.settings.retention_days
        if days is None:
            return succeed(None)
        cutoff = self._clock.seconds() - days * 86400.0

        async def purge() -> None:
            total = 0
            while True:
                deleted = await self._read(purge_timeline_txn, cutoff, self.settings.purge_batch)
                total += deleted
                if deleted < self.settings.purge_batch:
                    break
            self.counts["purged"] += total
            if total:
                _log.info("timeline: purged {count} messages past retention", count=total)

        d = Deferred.fromCoroutine(purge())
        d.addErrback(
            lambda failure: _log.warn(
                "timeline: the retention purge failed ({why})", why=failure.getErrorMessage()
            )
        )
        return d
