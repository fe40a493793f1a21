"""Timelines numbered in memory and journaled (the embedded SQLite database).

On SQLite the node is the database's only writer, so it need not number a message in
the transaction that writes it (``cim.storage.timeline.append_txn``, what PostgreSQL
keeps, where several nodes write): it keeps each conversation's last seq in memory
and numbers a message at once, on the reactor thread. Before a message is promised
(the Deferred of ``append`` fires: msg:A, msg:N), its record is appended to a journal
file beside the database (``cim.history.journal_file``, a reserved and mapped file),
one write for the records a client's read numbered, as that read ends (so their
answers leave with the read's own frames), or, outside reads, per reactor turn; the
records are then copied
into SQLite in large batches through the one batch writer (``copy_txn``: replay-safe,
renumbers nothing), and a journal file is deleted once all its records are there. At
start, what an earlier run journaled is copied first (``start``), so a promise
survives the process being killed.

The database lags the promises by up to a batch, so everything that reads the
timelines waits first for what was journaled before it (``settled``: the waiting
batch is written at once). A conversation not in memory is loaded by one read after
such a wait (so an entry can be forgotten at any time: the database is current for
it when it comes back); so is the highest client sequence of a sender device.

Resends (``[state] dedup_window``) are found without a read for nearly every
message: cim's clients number their messages from the clock in microseconds
(``cim.client.session``, clients/js), so a device's client sequences rise; a message
above the device's highest one is new. One at or below it is looked up among the
device's recent ones, then, rarely (a clock stepped back, a forgotten entry), in the
database. Message ids likewise: one above every id the database held at start and
not among the recent ones is new.

A recall or edit (``change``) numbers its entry in its own transaction: numbering
pauses (appends wait in their conversation's queue) while it runs.
"""

from __future__ import annotations

import operator
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import TypeVar

from sqlalchemy.engine import make_url
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.history.answers import Answer
from cim.history.journal_copies import JournalCopies
from cim.history.journal_file import JournalFiles, encode
from cim.history.unavailable import TimelineUnavailable
from cim.protocols.held_writes import Later, no_read
from cim.storage.database import Database, is_sqlite
from cim.storage.timeline import Appended, NewMessage
from cim.storage.timeline_journal import (
    CopyRow,
    Numbered,
    device_high_txn,
    found_again_txn,
    highest_id_txn,
    last_seq_txn,
    replay_txn,
    row_of,
)

__all__ = ["COPY_BATCH", "COPY_WAIT", "Journal", "journal_directory"]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

COPY_BATCH = 500
"""Records per copy transaction."""
COPY_WAIT = 0.25
"""Seconds a record waits for others before its copy is written (a read does not)."""
CONVERSATIONS_KEPT = 200_000
DEVICES_KEPT = 50_000
"""Conversations and devices whose numbering is kept in memory. Past these, the
earliest loaded eighth is dropped at once (loaded again, after a settle, when next
needed): first loaded, first dropped, not least recently used, so numbering a
message does not reorder them (a cache miss or two per message on a quiet core)."""
IDS_KEPT = 10_000
"""Recent message ids answered from memory. New ids only grow, so a new message never
needs this; only a resend of an older id is looked up in the database (rare: a resend
carries its client sequence, found in the device's recent ones first). Kept small so
a busy node's memory does not grow with its traffic (figure 7, churn); past it, the
earliest eighth is dropped at once, as for conversations."""
RECENT_PER_DEVICE = 8
"""Client sequences per device answered from memory: about a sending window; an
older resend is looked up in the database. 50,000 devices hold about 20 MB."""
_log = Logger(namespace="cim.timeline")


def journal_directory(url: str) -> str | None:
    """Where the journal goes: beside a SQLite file; None for PostgreSQL or a SQLite
    database in memory (nothing to survive a restart: appends number in SQL)."""
    if not is_sqlite(url):
        return None
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file::memory:"):
        return None
    return os.path.dirname(os.path.abspath(path))


@dataclass(eq=False, slots=True)
class _Taken:
    """A message waiting in its conversation's queue (a load, a lookup, a pause). One
    numbered at once is never wrapped in one."""

    message: NewMessage
    answer: Answer
    checked: bool = False
    """The full resend lookup found nothing: it is new."""


_ROW = operator.itemgetter(1)
"""A ``_Held``'s row: what the copy writes, and all the batch writer keeps."""
_RECORD = operator.itemgetter(2)
"""A ``_Held``'s journal record."""


@dataclass(eq=False, slots=True)
class _Device:
    high: int
    recent: OrderedDict[int, tuple[int, str, int, float]] = field(default_factory=OrderedDict)
    """client_seq -> (msg_id, conversation, seq, sent_at): plain tuples, which the
    garbage collector stops tracking (see ``_ids``)."""


_Held = tuple[Answer, CopyRow, bytes, Appended]
"""A message numbered this turn: who waits, its row (what the copy writes, and what a
failed write gives back), its journal record's bytes, and the answer."""


class _Wait:
    """What numbering a message waits for: its device loaded, or the full lookup."""


_LOAD = _Wait()
_LOOKUP = _Wait()

# Each message's answer, built by tuple's own constructor: a NamedTuple's generated
# ``__new__`` is a Python call, about 0.1 µs (docs/benchmarks.md).
_appended: Callable[[tuple[int, str, int, bool]], Appended] = partial(tuple.__new__, Appended)


def _keep_at_most(kept: dict[K, V], most: int) -> list[K]:
    """Past ``most`` entries, drop the earliest added eighth (one pass, not one each);
    returns the keys dropped."""
    if len(kept) <= most:
        return []
    dropped = list(islice(kept, len(kept) - most + most // 8))
    for key in dropped:
        del kept[key]
    return dropped


def _run_now(work: Callable[[], object]) -> object:
    return work()


class Journal:
    """Numbering, the journal and the copy into SQLite; see the module."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        directory: str,
        *,
        dedup_window: float,
        counts: Counter[str],
        copy_batch: int = COPY_BATCH,
        copy_wait: float = COPY_WAIT,
        roll_bytes: int = 8 << 20,
    ) -> None:
        self._db = db
        self._clock = clock
        self._files = JournalFiles(directory, roll_bytes=roll_bytes)
        self._window = dedup_window
        self.counts = counts
        self.answer_scope: Callable[[Callable[[], object]], object] = _run_now
        """Runs the code that answers a turn's messages (``Timelines.answer_in``)."""
        self.at_read_end: Later = no_read
        """Runs work as the read under way ends, or says there is none
        (``HeldWrites.at_read_end``): records numbered in a read are written then."""
        self.after_flush: Later = no_read
        """Runs work once the frames the read under way made have left, or says there
        is none (``HeldWrites.after_flush``): a turn's rows reach the copy then."""
        self._copies = JournalCopies(
            db, clock, self._files, counts, batch_size=copy_batch, batch_wait=copy_wait
        )
        self._last: dict[str, int] = {}
        self._devices: dict[tuple[str, str], _Device] = {}
        self._ids: dict[int, tuple[int, str, int]] = {}
        """msg_id -> (msg_id, conversation, seq) of the last ``IDS_KEPT`` numbered.
        Plain tuples, not ``Appended``: CPython stops tracking a tuple of untracked
        values at its first collection, but never a tuple subclass, so ten thousand
        kept ``Appended`` were walked by every full collection (docs/benchmarks.md)."""
        self._unloaded: OrderedDict[tuple[str, str], int] = OrderedDict()
        """The highest client sequence numbered for a device not loaded (a message
        taken after the full lookup): its load may read the database before that
        message's copy, and must not come back lower (the resend would look new)."""
        self._id_floor = 0
        self._queues: dict[str, deque[_Taken]] = {}
        self._loading: set[object] = set()
        self._turn: IDelayedCall | None = None
        self._turn_at_read_end = False
        """The turn's write waits for the end of the read under way, not ``_turn``."""
        self._buffer: list[_Held] = []
        self._resends: list[tuple[Answer, Appended]] = []
        """Resends answered after the turn's write (their first may be in it)."""
        self._paused = 0
        self._draining = False
        self._drain_again = False
        self._ready = False
        self._stopping = False
        self.broken = False
        """A journal write failed and could not be undone: no message is taken."""

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Copy what an earlier run journaled, then start a fresh file."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            self._files.lock()
        except OSError as e:
            raise TimelineUnavailable(
                f"the timeline journal in {self._files.directory} is in use by another "
                f"process ({e.strerror}): one node per SQLite database"
            ) from None
        replayed = 0
        chunk: list[Numbered] = []
        for record in self._files.recover():
            chunk.append(record)
            if len(chunk) >= COPY_BATCH:
                replayed += await self._db.run(replay_txn, chunk)
                chunk = []
        if chunk:
            replayed += await self._db.run(replay_txn, chunk)
        if replayed:
            _log.info("timeline: replayed {count} journaled messages", count=replayed)
        self.counts["replayed"] += replayed
        try:
            self._files.open()
        except OSError as e:
            self._files.unlock()  # a later start (the service retried) may take it
            raise TimelineUnavailable(
                f"the timeline journal in {self._files.directory} cannot be written ({e.strerror})"
            ) from None
        self._id_floor = await self._db.run(highest_id_txn)
        self._ready = True

    def stop(self) -> Deferred[None]:
        """Journal and copy what is held; a copy that fails stays in the journal, for
        the next start."""
        self._stopping = True
        for queue in self._queues.values():
            for taken in queue:
                if not taken.answer.called:
                    taken.answer.errback(TimelineUnavailable("the node is stopping"))
        self._queues.clear()
        self._write_turn()

        async def drain() -> None:
            await self._copies.stop()
            clean = self.unwritten == 0
            if self._ready:
                self._files.close(clean=clean)
            if not clean:
                _log.warn(
                    "timeline: {count} journaled messages are not in the database yet; "
                    "the next start copies them",
                    count=self.unwritten,
                )

        return Deferred.fromCoroutine(drain())

    @property
    def unwritten(self) -> int:
        """Messages taken (numbered or waiting to be) and not yet in the database."""
        queued = sum(len(q) for q in self._queues.values()) if self._queues else 0
        return queued + len(self._buffer) + self._copies.behind

    @property
    def waiting(self) -> int:
        """What the node's backpressure counts (``[im] max_pending_work``): messages
        not yet promised (waiting for a load or the turn's write), and the copies'
        backlog past one batch (the database falls behind). A batch in the making is
        not pressure: the copy waits for it on purpose."""
        copies = self._copies
        lag = max(0, copies.behind - copies.batch_size)
        if not self._queues:  # nearly always: asked for every frame the node reads
            return len(self._buffer) + lag
        return sum(len(q) for q in self._queues.values()) + len(self._buffer) + lag

    def journal_bytes(self) -> int:
        return self._files.size()

    # --- appending --------------------------------------------------------------------

    def append(self, message: NewMessage) -> Deferred[Appended]:
        answer: Deferred[Appended] = Deferred()
        self.take(message, answer)
        return answer

    def take(self, message: NewMessage, answer: Answer) -> None:
        """``append``, answered through ``answer`` (``cim.history.answers``)."""
        if not self._ready or self._stopping or self.broken:
            answer.errback(TimelineUnavailable("the timeline cannot be written now"))
            return
        key = message.conversation
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(_Taken(message, answer))
        elif not self._step(message, answer, None):
            # Queued only now: what _step started may have ended already (a database
            # that answers at once), so the queue is tried again; a full lookup
            # starts there, for the queued message.
            self._queues[key] = deque([_Taken(message, answer)])
            self._drain()

    def _step(self, m: NewMessage, answer: Answer, taken: _Taken | None) -> bool:
        """Answer or number ``m`` now (True), or start what it waits for (False).
        ``taken``: its place in a queue; None when it is not queued yet."""
        if self._paused:
            return False
        last = self._last.get(m.conversation)
        if last is None:
            self._load(m.conversation, self._load_conversation)
            return False
        found: _Device | Appended | _Wait | None
        if taken is not None and taken.checked:
            found = self._devices.get((m.sender, m.sender_device)) if m.client_seq else None
        else:
            found = self._known(m)
        if found is None or isinstance(found, _Device):  # a new message
            self._last[m.conversation] = seq = last + 1
            self._number(m, answer, seq, found)
            return True
        if isinstance(found, Appended):
            self.counts["resent"] += 1
            if self._buffer:  # its first may be in this turn's write: answer after it
                self._resends.append((answer, found))
            else:
                answer.callback(found)
            return True
        if found is _LOAD:
            self._load((m.sender, m.sender_device), self._load_device)
        elif taken is not None:
            self._load(taken, self._look_up)
        return False

    def _known(self, m: NewMessage) -> _Device | Appended | _Wait | None:
        """The earlier Appended of a resend; for a new message its sender device's
        ``_Device`` (None when it has no client sequence), so numbering it looks the
        device up once; or what to do to know (``_LOAD`` the device, ``_LOOKUP`` in
        the database)."""
        hit = self._ids.get(m.msg_id)
        if hit is not None:
            return _appended((*hit, False))
        if m.msg_id <= self._id_floor:
            return _LOOKUP
        if not m.client_seq:
            return None
        key = (m.sender, m.sender_device)
        device = self._devices.get(key)
        if device is None:
            return _LOAD
        if m.client_seq > device.high:
            return device
        recent = device.recent.get(m.client_seq)
        if recent is None:
            return _LOOKUP
        msg_id, conversation, seq, sent_at = recent
        if sent_at < self._clock.seconds() - self._window:
            return device  # past the window: taken again, as the database lookup would
        return _appended((msg_id, conversation, seq, False))

    def _number(self, m: NewMessage, answer: Answer, seq: int, device: _Device | None) -> None:
        appended = _appended((m.msg_id, m.conversation, seq, True))
        ids = self._ids
        ids[m.msg_id] = (m.msg_id, m.conversation, seq)
        if len(ids) > IDS_KEPT:
            forgotten = _keep_at_most(ids, IDS_KEPT)
            self._id_floor = max(self._id_floor, *forgotten)
        client_seq = m.client_seq
        if device is not None:
            if client_seq > device.high:
                device.high = client_seq
            recent = device.recent
            recent[client_seq] = (m.msg_id, m.conversation, seq, m.sent_at)
            if len(recent) > RECENT_PER_DEVICE:
                recent.popitem(last=False)
        elif m.client_seq:  # looked up by id, the device not loaded: its load takes this
            key = (m.sender, m.sender_device)
            self._unloaded[key] = max(self._unloaded.pop(key, 0), m.client_seq)
            while len(self._unloaded) > DEVICES_KEPT:
                self._unloaded.popitem(last=False)
        row = row_of(m, seq)
        if seq == 1 and m.readers:
            self._copies.starting[m.conversation] = m.readers
        self._buffer.append((answer, row, encode(row, m.readers), appended))
        if self._turn is None and not self._turn_at_read_end:
            if self.at_read_end(self._write_at_read_end):
                self._turn_at_read_end = True
            else:
                self._turn = self._clock.callLater(0, self._write_turn)

    def _write_at_read_end(self) -> None:
        """The write for the records a read numbered, as that read ends: the answers
        leave with the read's own frames (``HeldWrites.at_read_end``). Unless a stop or
        an exclusive change wrote them already."""
        if self._turn_at_read_end:
            self._turn_at_read_end = False
            self._write_and_promise()

    def _write_turn(self) -> None:
        """One write for the turn's records, then their promises, inside
        ``answer_scope`` so the frames they make leave in one send per connection."""
        turn, self._turn = self._turn, None
        self._turn_at_read_end = False
        if turn is not None and turn.active():
            turn.cancel()
        self.answer_scope(self._write_and_promise)

    def _write_and_promise(self) -> None:
        buffer, self._buffer = self._buffer, []
        resends, self._resends = self._resends, []
        if buffer:
            try:
                generation = self._files.write(b"".join(map(_RECORD, buffer)), len(buffer))
            except OSError as e:
                self._unnumber(buffer, e)
                for answer, _ in resends:
                    answer.errback(TimelineUnavailable(f"the journal cannot be written: {e}"))
                return
            # Promised: each message is answered. The copy counts the records now and
            # takes their rows once the answers' frames have left: a live copy does
            # not wait for that bookkeeping.
            count = len(buffer)
            self._copies.count(count, generation)
            self.counts["journaled"] += count
            for answer, _, _, appended in buffer:
                answer.callback(appended)
            rows = partial(self._copies.put, map(_ROW, buffer))
            if not self.after_flush(rows):
                rows()
        for answer, found in resends:
            answer.callback(found)

    def _unnumber(self, buffer: list[_Held], error: OSError) -> None:
        """The journal write failed: nothing of it was promised, its numbers are free."""
        self.counts["journal_failed"] += 1
        _log.error("timeline: the journal write failed ({why})", why=str(error))
        for answer, row, _, _ in buffer:
            conversation, seq, msg_id, sender, sender_device, client_seq = row[:6]
            if seq == 1:
                self._copies.starting.pop(conversation, None)
            self._ids.pop(msg_id, None)
            self._last.pop(conversation, None)  # loaded again after a settle
            device = self._devices.get((sender, sender_device))
            if device is not None:
                device.recent.pop(client_seq, None)
            answer.errback(TimelineUnavailable(f"the journal cannot be written: {error}"))
        if not self._files.writable:
            self.broken = True

    # --- loading ----------------------------------------------------------------------

    def _load(self, key: object, load: Callable[[object], Awaitable[None]]) -> None:
        """Start ``load(key)`` once; every queue is tried again when it ends."""
        if key in self._loading:
            return
        self._loading.add(key)

        async def run() -> None:
            try:
                await self.settled()
                await load(key)
            finally:
                self._loading.discard(key)

        d = Deferred.fromCoroutine(run())
        d.addErrback(self._load_failed, key)
        d.addCallback(lambda _: self._drain())

    async def _load_conversation(self, key: object) -> None:
        assert isinstance(key, str)
        last = await self._db.run(last_seq_txn, key)
        self._last.setdefault(key, last)
        _keep_at_most(self._last, CONVERSATIONS_KEPT)

    async def _load_device(self, key: object) -> None:
        assert isinstance(key, tuple)
        high = await self._db.run(device_high_txn, key[0], key[1])
        high = max(high, self._unloaded.pop(key, 0))
        self._devices.setdefault(key, _Device(high))
        _keep_at_most(self._devices, DEVICES_KEPT)

    async def _look_up(self, key: object) -> None:
        assert isinstance(key, _Taken)
        self.counts["looked_up"] += 1
        since = self._clock.seconds() - self._window
        found = await self._db.run(found_again_txn, key.message, since)
        if found is None:
            key.checked = True
        elif not key.answer.called:
            self.counts["resent"] += 1
            key.answer.callback(found)  # the drain takes it off its queue

    def _load_failed(self, failure: Failure, key: object) -> None:
        """The database did not answer: what waited on it is refused (the sender
        resends), and nothing is numbered from a guess."""
        conversation = key.message.conversation if isinstance(key, _Taken) else key
        queues = [conversation] if isinstance(conversation, str) else list(self._queues)
        for name in queues:
            queue = self._queues.pop(name, None) or deque()
            for taken in queue:
                if not taken.answer.called:
                    taken.answer.errback(TimelineUnavailable(failure.getErrorMessage()))

    def _drain(self) -> None:
        """Number what waits, in each conversation's order (not re-entered: a load
        that ends at once asks for another pass instead)."""
        if self._draining:
            self._drain_again = True
            return
        self._draining = True
        try:
            self._drain_again = True
            while self._drain_again:
                self._drain_again = False
                for key in list(self._queues):
                    queue = self._queues.get(key)
                    while queue:
                        head = queue[0]
                        if not (head.answer.called or self._step(head.message, head.answer, head)):
                            break
                        queue.popleft()
                    if not queue:
                        self._queues.pop(key, None)
        finally:
            self._draining = False

    # --- copying ----------------------------------------------------------------------

    def settled(self, *, hurry: bool = True) -> Deferred[None]:
        """``JournalCopies.settled``: every message promised so far in the database."""
        return self._copies.settled(hurry=hurry)

    # --- changes ----------------------------------------------------------------------

    def exclusive(self, work: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """Run ``work`` (which numbers in SQL: a change) with numbering paused and the
        database current; ``work`` tells ``numbered`` what it numbered."""

        async def run() -> T:
            self._paused += 1
            try:
                # What this turn numbered is not yet journaled, so ``settled`` would
                # not wait for it, and ``work`` would give its seq again in SQL (the
                # copy then drops the promised message as already there).
                if self._buffer:
                    self._write_turn()
                await self.settled()
                return await work()
            finally:
                self._paused -= 1
                if not self._paused:
                    self._drain()

        return Deferred.fromCoroutine(run())

    def numbered(self, conversation: str, seq: int) -> None:
        """A seq given in SQL (``exclusive``): the next message comes after it."""
        if conversation in self._last:
            self._last[conversation] = max(self._last[conversation], seq)
