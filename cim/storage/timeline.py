"""Transactions on the timelines (``conversations``, ``timeline``, ``user_conversations``,
``cursors``), run by ``Database.run``; docs/internals.md "Timelines" says why.

``append_txn`` numbers messages inside the transaction that writes them: one
``INSERT ... ON CONFLICT DO UPDATE SET last_seq = last_seq + n RETURNING last_seq``
for the batch's conversations (each conversation's row lock: two nodes appending to
one conversation wait for each other, so numbers are dense and never given twice; a
batch that rolls back gives back nothing, because the raised ``last_seq`` rolls back
with it), then one bulk insert of the rows. Conversations are locked in key order, so
two batches that share conversations cannot deadlock.

Reads are pages by seq (one conversation) or by message id (across all of a user's),
bounded in count and in bytes: the sizes are read first, then only the payloads that
fit; one message larger than the bound comes alone.

Inputs are expected to be well-formed (ids in range, names checked): ``cim.history.
timeline`` does that before any database work.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import and_, case, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from cim.history.store import group_conversation
from cim.storage.schema import conversations, cursors, timeline, user_conversations

__all__ = [
    "ENROLMENT_MARK",
    "TIMELINE_COLUMNS",
    "Appended",
    "ConversationState",
    "CursorMove",
    "NewMessage",
    "TimelinePage",
    "TimelineRecord",
    "add_readers_txn",
    "append_txn",
    "enrol_and_move_txn",
    "enrol_device_txn",
    "forget_user",
    "group_joined",
    "group_left",
    "move_cursors_txn",
    "remove_readers_txn",
]

_CHUNK = 500
"""Values per ``IN (...)`` or bulk insert: well below SQLite's bound-parameter limit."""


# --- records --------------------------------------------------------------------------
# The records made for every message are NamedTuples: as immutable as a frozen
# dataclass, and made in half the time (a frozen dataclass sets each field with
# ``object.__setattr__``), which the message path pays several times per message.


class NewMessage(NamedTuple):
    """A message to append. ``readers``: a 1:1 conversation's two users (user, peer),
    who read it from its first message on; empty for a group's (members join)."""

    conversation: str
    msg_id: int
    sender: str
    sender_device: str
    client_seq: int
    sent_at: float
    payload: bytes
    readers: tuple[tuple[str, str], ...] = ()


class Appended(NamedTuple):
    """Where a message is: its id (an earlier one's for a resend found again) and seq."""

    msg_id: int
    conversation: str
    seq: int
    new: bool


class CursorMove(NamedTuple):
    user: str
    device: str
    conversation: str
    seq: int


@dataclass(frozen=True, slots=True)
class TimelineRecord:
    conversation: str
    seq: int
    msg_id: int
    sent_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class TimelinePage:
    """Newest first. ``more``: older ones remain; ``next_before`` is where to go on
    (a seq for one conversation's page, a message id for a page across all)."""

    records: tuple[TimelineRecord, ...]
    more: bool
    next_before: int = 0


@dataclass(frozen=True, slots=True)
class ConversationState:
    """One of a user's conversations as one of its devices sees it."""

    conversation: str
    peer: str | None
    group_id: str | None
    last_seq: int
    cursor: int
    """The device's read point: the highest of its cursor, the user's floor and the
    user's read mark (cim.storage.read_marks): what is past it is unread."""
    newest: TimelineRecord | None
    """The newest message when some are unread (past ``cursor``), else None."""
    read: int = 0
    """The user's read mark (any of its devices marked the conversation read so far)."""
    peer_read: int = 0
    """A 1:1: how far the peer has read, as the peer lets others see (0: nothing)."""

    @property
    def unread(self) -> int:
        return max(0, self.last_seq - self.cursor)


# --- helpers --------------------------------------------------------------------------


def _insert(connection: Connection, table: Any) -> Any:
    """The dialect's own INSERT, since ON CONFLICT is not in SQLAlchemy's generic one."""
    name = connection.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"cim does not support the {name} database")


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


_KEYS_PER_READ = 200
"""Composite keys per read: SQLite looks up ``a = ? AND b = ? OR ...`` in an index
(a row-value ``IN`` would scan the table), and its expression depth stays bounded."""


def _any_of(columns: Sequence[Any], keys: Iterable[Sequence[Any]]) -> ColumnElement[bool]:
    """``(c1 = k1 AND c2 = k2 ...) OR ...``: each composite key through its index."""
    return or_(*(and_(*(c == v for c, v in zip(columns, key, strict=True))) for key in keys))


# --- appending ------------------------------------------------------------------------


TIMELINE_COLUMNS = (
    "conversation",
    "seq",
    "msg_id",
    "sender",
    "sender_device",
    "client_seq",
    "sent_at",
    "payload",
    "size",
)
"""The timeline's columns in the order both inserts write them (append_txn here, the
journal's copy in cim.storage.timeline_journal)."""

CopyRow = tuple[str, int, int, str, str, int, float, bytes, int]
"""A numbered message as the journal keeps it until it is copied: a timeline row in
``TIMELINE_COLUMNS`` order, flat. CPython's collector stops tracking a tuple of
strings and numbers at its first collection; a ``NamedTuple`` (a tuple subclass) it
tracks as long as it lives, and a tuple in a tuple is let go one level per collection
that walks it; the copies wait for a whole batch (docs/benchmarks.md)."""


def row_of(m: NewMessage, seq: int) -> CopyRow:
    """The row of ``m`` numbered ``seq``: what a timeline append inserts, and what the
    journal holds and its copy writes."""
    return (
        m.conversation,
        seq,
        m.msg_id,
        m.sender,
        m.sender_device,
        m.client_seq,
        m.sent_at,
        m.payload,
        len(m.payload),
    )


@functools.lru_cache(maxsize=256)
def _insert_sql(paramstyle: str, rows: int = 1) -> str:
    """INSERT INTO timeline of ``rows`` rows in the driver's own placeholders (sqlite3:
    ``?``, psycopg2: ``%s``)."""
    mark = "?" if paramstyle == "qmark" else "%s"
    row = f"({', '.join(mark for _ in TIMELINE_COLUMNS)})"
    return f"INSERT INTO timeline ({', '.join(TIMELINE_COLUMNS)}) VALUES {', '.join([row] * rows)}"


_ROWS_PER_INSERT = 100
"""Rows per multi-row INSERT on PostgreSQL: a batch of 200 is two statements, and the
statement texts (one per size up to this) stay few enough to cache (``_insert_sql``)."""


def _insert_rows(connection: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """The hot path's bulk insert, straight to the driver (the values are plain ints,
    floats, strings and bytes: no per-row parameter processing).

    psycopg2's ``executemany`` is one round trip to the server per row, which made
    the insert most of a PostgreSQL batch's time; there the rows go as multi-row
    ``VALUES`` instead (one round trip per ``_ROWS_PER_INSERT``). SQLite runs in
    process, where ``executemany`` is the cheap way."""
    paramstyle = connection.dialect.paramstyle
    if connection.dialect.name != "postgresql":
        connection.exec_driver_sql(_insert_sql(paramstyle), list(rows))
        return
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        part = rows[start : start + _ROWS_PER_INSERT]
        flat = tuple(value for row in part for value in row)
        connection.exec_driver_sql(_insert_sql(paramstyle, len(part)), flat)


@functools.lru_cache(maxsize=512)
def _lookup_sql(paramstyle: str, ids: int, keys: int) -> str:
    """The resend lookup as plain SQL in the driver's placeholders: built from two
    counts and cached, where an expression tree of thousands of nodes would be built
    and its cache key computed again for every batch. Each ``sender = ... AND ...``
    term is a lookup in ``ix_timeline_sender`` (SQLite scans the table for a row-value
    ``IN``)."""
    mark = "?" if paramstyle == "qmark" else "%s"
    terms = [f"msg_id IN ({', '.join(mark for _ in range(ids))})"]
    key = f"(sender = {mark} AND sender_device = {mark} AND client_seq = {mark})"
    terms += [key] * keys
    return (
        "SELECT msg_id, conversation, seq, sender, sender_device, client_seq, sent_at "
        "FROM timeline WHERE " + " OR ".join(terms)
    )


def _found_again(
    connection: Connection, batch: Sequence[NewMessage], dedup_since: float
) -> dict[int, Appended]:
    """Messages of the batch already in a timeline, in one read: by id (a resend the
    receipts knew), or by (sender, device, client_seq) within the dedup window (the
    receipts were lost)."""
    found: dict[int, Appended] = {}
    by_key: dict[int, Appended] = {}
    keyed = {(m.sender, m.sender_device, m.client_seq): m.msg_id for m in batch if m.client_seq}
    ids = {m.msg_id for m in batch}
    for start in range(0, len(batch), _KEYS_PER_READ):
        part = batch[start : start + _KEYS_PER_READ]
        with_keys = [m for m in part if m.client_seq]
        params: list[Any] = [m.msg_id for m in part]
        for m in with_keys:
            params += (m.sender, m.sender_device, m.client_seq)
        sql = _lookup_sql(connection.dialect.paramstyle, len(part), len(with_keys))
        for row in connection.exec_driver_sql(sql, tuple(params)):
            where = Appended(row.msg_id, row.conversation, row.seq, False)
            if row.msg_id in ids:
                found[row.msg_id] = where
            # The window is checked here, not in SQL: a condition on sent_at would make
            # SQLite scan the window's rows instead of looking the keys up.
            asked = keyed.get((row.sender, row.sender_device, row.client_seq))
            if asked is not None and row.sent_at >= dedup_since:
                by_key.setdefault(asked, where)
    for asked, where in by_key.items():
        found.setdefault(asked, where)  # an id found as itself wins
    return found


def append_txn(
    connection: Connection, batch: Sequence[NewMessage], dedup_since: float = 0.0
) -> dict[int, Appended]:
    """Append a batch; returns where each message (by the id it came with) now is.

    A message already appended (same id, or same sender, device and client sequence
    sent since ``dedup_since``) is not appended again: its answer names the first.
    """
    placed = _found_again(connection, batch, dedup_since)
    fresh: dict[str, list[NewMessage]] = defaultdict(list)
    taken: set[int] = set()
    for message in batch:
        if message.msg_id in placed or message.msg_id in taken:
            continue
        taken.add(message.msg_id)
        fresh[message.conversation].append(message)
    rows: list[tuple[Any, ...]] = []
    readers: dict[tuple[str, str], dict[str, Any]] = {}
    keys = sorted(fresh)  # one lock order for every writer: no deadlock
    last: dict[str, int] = {}
    if keys:
        # One statement (executed as multi-row VALUES batches, compiled once) numbers
        # every conversation of the batch: each row's lock is held to commit, so a
        # conversation's numbers are this batch's alone.
        statement = _insert(connection, conversations)
        upsert = statement.on_conflict_do_update(
            index_elements=[conversations.c.key],
            set_={"last_seq": conversations.c.last_seq + statement.excluded.last_seq},
        ).returning(conversations.c.key, conversations.c.last_seq)
        rows_in = [{"key": key, "last_seq": len(fresh[key])} for key in keys]
        last.update((key, int(seq)) for key, seq in connection.execute(upsert, rows_in))
    for key in keys:
        messages = fresh[key]
        count = len(messages)
        for offset, message in enumerate(messages):
            seq = last[key] - count + 1 + offset
            placed[message.msg_id] = Appended(message.msg_id, key, seq, True)
            rows.append(row_of(message, seq))
        if last[key] == count:  # the conversation's first messages: its readers start
            for user, peer in messages[0].readers:
                readers[(user, key)] = {
                    "user_name": user,
                    "conversation": key,
                    "peer": peer,
                    "group_id": None,
                    "floor_seq": 0,
                }
    if rows:
        _insert_rows(connection, rows)
    if readers:
        connection.execute(
            _insert(connection, user_conversations).on_conflict_do_nothing(),
            list(readers.values()),
        )
    return placed


# --- readers of a conversation (group membership) -----------------------------------


def add_readers_txn(
    connection: Connection, conversation: str, users: Iterable[str], group_id: str
) -> None:
    """Members joining a group read its timeline from now on (floor at ``last_seq``:
    a new member does not inherit old unread). Runs inside the joining transaction."""
    names = sorted(set(users))
    if not names:
        return
    connection.execute(
        _insert(connection, conversations)
        .values(key=conversation, last_seq=0)
        .on_conflict_do_nothing(index_elements=[conversations.c.key])
    )
    last = int(
        connection.execute(
            select(conversations.c.last_seq).where(conversations.c.key == conversation)
        ).scalar_one()
    )
    connection.execute(
        _insert(connection, user_conversations).on_conflict_do_nothing(),
        [
            {
                "user_name": user,
                "conversation": conversation,
                "peer": None,
                "group_id": group_id,
                "floor_seq": last,
            }
            for user in names
        ],
    )


def group_joined(connection: Connection, group_id: str, users: Iterable[str]) -> None:
    """In the transaction that adds members: they read the group from now on."""
    add_readers_txn(connection, group_conversation(group_id), users, group_id)


def group_left(connection: Connection, group_id: str, users: Iterable[str] | None) -> None:
    """In the transaction that removes members (None: all, dissolved)."""
    remove_readers_txn(connection, group_conversation(group_id), users)


def remove_readers_txn(
    connection: Connection, conversation: str, users: Iterable[str] | None = None
) -> None:
    """Members leaving (None: everyone, the group is gone) stop reading it."""
    readers = user_conversations.c.conversation == conversation
    marks = cursors.c.conversation == conversation
    if users is not None:
        names = sorted(set(users))
        if not names:
            return
        readers = and_(readers, user_conversations.c.user_name.in_(names))
        marks = and_(marks, cursors.c.user_name.in_(names))
    connection.execute(delete(user_conversations).where(readers))
    connection.execute(delete(cursors).where(marks))


def forget_user(connection: Connection, name: str) -> None:
    """An account is deleted: its 1:1 conversations lose their messages (a name can
    be registered again, and whoever took it must not read these chats), its reader
    rows and cursors go; the conversations keep their ``last_seq``, so a seq is never
    given twice, and the peers' floors move there (nothing left unread)."""
    mine = list(
        connection.execute(
            select(user_conversations.c.conversation).where(
                user_conversations.c.user_name == name, user_conversations.c.peer.is_not(None)
            )
        ).scalars()
    )
    for chunk in _chunks(sorted(mine)):
        connection.execute(delete(timeline).where(timeline.c.conversation.in_(chunk)))
        connection.execute(
            user_conversations.update()
            .where(user_conversations.c.conversation.in_(chunk))
            .values(
                floor_seq=select(conversations.c.last_seq)
                .where(conversations.c.key == user_conversations.c.conversation)
                .scalar_subquery()
            )
        )
    connection.execute(delete(user_conversations).where(user_conversations.c.user_name == name))
    connection.execute(delete(cursors).where(cursors.c.user_name == name))


# --- cursors --------------------------------------------------------------------------

ENROLMENT_MARK = ""
"""The conversation key of a device's enrolment mark: a cursor row ``(user, device, "",
0)``. No conversation has this key (every key starts with "d:" or "g:"), so no read
ever joins it; it only says the account knows the device."""


def enrol_device_txn(connection: Connection, user: str, device: str) -> bool:
    """A device new to the account starts at the present (issue #15): when another
    device of the account has read something (a cursor in a conversation), its cursors
    are set at each conversation's ``last_seq``, so nothing already there counts as
    unread on it (it can still page back through history). Otherwise it starts at the
    user's floors, as the account's first device does (what waited for the user is
    unread). Either way the device is marked known; True when it was new.

    Run when a device connects, before anything reaches it, and again by its catch-up
    reads (a no-op then). A device is known once it has any cursor row: one that
    acknowledged anything before devices were enrolled is not moved."""
    # Plain SQL in the driver's placeholders, like the timeline's hot paths: it runs at
    # every login, and building the expression trees cost several times the queries.
    sql = _enrol_sql(connection.dialect.paramstyle)
    if connection.exec_driver_sql(sql.known, (user, device)).first() is not None:
        return False
    others = connection.exec_driver_sql(sql.others, (user, device, ENROLMENT_MARK)).first()
    rows = [(user, device, ENROLMENT_MARK, 0)]
    if others is not None:
        rows.extend(
            (user, device, conversation, int(last_seq))
            for conversation, last_seq in connection.exec_driver_sql(sql.last_seqs, (user,))
        )
    connection.exec_driver_sql(sql.insert, rows)
    return True


@dataclass(frozen=True)
class _EnrolSql:
    known: str
    others: str
    last_seqs: str
    insert: str


@functools.lru_cache(maxsize=4)
def _enrol_sql(paramstyle: str) -> _EnrolSql:
    """enrol_device_txn's statements in the driver's placeholders (sqlite3: ``?``,
    psycopg2: ``%s``); both databases take ``ON CONFLICT DO NOTHING``."""
    mark = "?" if paramstyle == "qmark" else "%s"
    return _EnrolSql(
        known=f"SELECT 1 FROM cursors WHERE user_name = {mark} AND device = {mark} LIMIT 1",
        others=(
            f"SELECT 1 FROM cursors WHERE user_name = {mark} AND device <> {mark} "
            f"AND conversation <> {mark} LIMIT 1"
        ),
        last_seqs=(
            "SELECT uc.conversation, c.last_seq FROM user_conversations AS uc "
            'JOIN conversations AS c ON c."key" = uc.conversation '
            f"WHERE uc.user_name = {mark}"
        ),
        insert=(
            "INSERT INTO cursors (user_name, device, conversation, seq) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}) ON CONFLICT DO NOTHING"
        ),
    )


def enrol_and_move_txn(
    connection: Connection, enrolments: Sequence[tuple[str, str]], moves: Sequence[CursorMove]
) -> int:
    """A batch of the node's cursor work in one transaction: the devices that connected
    (``enrol_device_txn``, each (user, device) in turn), then the cursor moves
    (``move_cursors_txn``, whose count it returns). Enrolments first: a device's own
    moves all come after its enrolment, so a device new to the account is never taken
    as known because of a move of its own."""
    for user, device in enrolments:
        enrol_device_txn(connection, user, device)
    return move_cursors_txn(connection, moves)


def move_cursors_txn(connection: Connection, moves: Sequence[CursorMove]) -> int:
    """Move device cursors forward (never back, never past ``last_seq``, only in the
    user's own conversations); returns how many moved. Two reads per chunk of users and
    conversations and one batched upsert, whatever the number of users: a group's
    members acknowledging one message are one batch."""
    wanted: dict[tuple[str, str, str], int] = {}
    for move in moves:
        key = (move.user, move.device, move.conversation)
        wanted[key] = max(wanted.get(key, 0), move.seq)
    if not wanted:
        return 0
    # Rows for (user, conversation) pairs nobody asked about are ignored.
    users = sorted({user for user, _, _ in wanted})
    keys = sorted({conversation for _, _, conversation in wanted})
    last: dict[tuple[str, str], int] = {}
    now: dict[tuple[str, str, str], int] = {}
    for user_chunk in _chunks(users):
        for chunk in _chunks(keys):
            for row in connection.execute(
                select(
                    user_conversations.c.user_name,
                    user_conversations.c.conversation,
                    conversations.c.last_seq,
                )
                .join(conversations, conversations.c.key == user_conversations.c.conversation)
                .where(
                    user_conversations.c.user_name.in_(user_chunk),
                    user_conversations.c.conversation.in_(chunk),
                )
            ):
                last[(row.user_name, row.conversation)] = int(row.last_seq)
            for mark in connection.execute(
                select(
                    cursors.c.user_name, cursors.c.device, cursors.c.conversation, cursors.c.seq
                ).where(cursors.c.user_name.in_(user_chunk), cursors.c.conversation.in_(chunk))
            ):
                now[(mark.user_name, mark.device, mark.conversation)] = int(mark.seq)
    values = []
    for (user, device, conversation), seq in sorted(wanted.items()):
        if (user, conversation) not in last:
            continue  # not one of the user's conversations
        target = min(seq, last[(user, conversation)])
        if target > now.get((user, device, conversation), 0):
            values.append(
                {"user_name": user, "device": device, "conversation": conversation, "seq": target}
            )
    if not values:
        return 0
    statement = _insert(connection, cursors)
    upsert = statement.on_conflict_do_update(
        index_elements=[cursors.c.user_name, cursors.c.device, cursors.c.conversation],
        set_={
            "seq": case(
                (statement.excluded.seq > cursors.c.seq, statement.excluded.seq),
                else_=cursors.c.seq,
            )
        },
        where=statement.excluded.seq > cursors.c.seq,
    )
    # One statement for the batch (executemany); the guard still keeps a cursor from
    # going back if another transaction moved it since the read above.
    connection.execute(upsert, values)
    return len(values)
