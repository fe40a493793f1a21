"""Transactions on ``offline_msgs`` and ``history``, run by ``Database.run``.

Both tables are written by consumers that may write the same message twice (a crash
between the commit and the broker's ack redelivers it), so every write is an
``INSERT ... ON CONFLICT DO NOTHING`` on the table's primary key: the second write
changes nothing and is not an error.

Pages are keyed by message id, not by offset: server ids are time-ordered and
unique, so "the ``limit`` newest below ``before``" neither skips nor repeats a
message when rows are added or deleted between two pages. A page is bounded in bytes
as well (``max_bytes``, what the answer frame may hold): the sizes are read first,
then only the payloads that fit, so neither the page nor the read is larger than the
bound; a single message larger than it comes alone.

Inputs are expected to be well-formed (ids in range, names checked): ``cim.offline``
does that before any database work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import Table, delete, func, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Insert

from cim.storage.schema import history, offline_msgs

__all__ = [
    "PAGE_ENTRY_OVERHEAD",
    "HistoryPage",
    "HistoryRecord",
    "OfflineFull",
    "OfflinePage",
    "OfflineRecord",
    "SenderCount",
    "archive_txn",
    "count_offline_txn",
    "delete_offline_txn",
    "history_page_txn",
    "offline_page_txn",
    "offline_summary_txn",
    "purge_history_txn",
    "store_offline_txn",
]

_CHUNK = 500
"""Ids per ``IN (...)``: well below SQLite's bound-parameter limit."""

_CAP_LOCK_CLASS = 0x6F66  # "of": the first key of the per-receiver advisory locks

PAGE_ENTRY_OVERHEAD = 6
"""Bytes a message costs in a page beyond its serialized size: its field tag and
length prefix (a varint of at most 5 bytes)."""


class OfflineFull(Exception):
    """Storing would take receivers past the per-user cap; nothing was stored.

    The sender must be told (never a silent drop), so the refusal names who is
    full. ``receivers`` lists every receiver of the batch that is; ``receiver`` is
    the first of them, for the common batch of one.
    """

    code: ClassVar[str] = "offline_full"

    def __init__(self, receivers: Sequence[str], limit: int) -> None:
        names = ", ".join(repr(name) for name in receivers)
        super().__init__(f"offline messages for {names} would exceed the limit of {limit}")
        self.receivers = tuple(receivers)
        self.receiver = self.receivers[0]
        self.limit = limit


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineRecord:
    """One row of ``offline_msgs``; the same shape goes in and comes out."""

    receiver: str
    msg_id: int
    send_time: float
    sender: str
    msg_type: int
    content: str
    group_id: str | None
    payload: bytes


@dataclass(frozen=True)
class OfflinePage:
    """Newest first. ``more``: older messages remain; ask again with ``next_before``."""

    records: tuple[OfflineRecord, ...]
    more: bool

    @property
    def next_before(self) -> int | None:
        return self.records[-1].msg_id if self.more and self.records else None


@dataclass(frozen=True)
class SenderCount:
    """The summary of one sender's waiting messages (design: 优化方案1)."""

    sender: str
    count: int
    newest_msg_id: int


@dataclass(frozen=True)
class HistoryRecord:
    conversation: str
    msg_id: int
    sender: str
    receiver: str | None
    group_id: str | None
    sent_at: float
    msg_type: int
    payload: bytes


@dataclass(frozen=True)
class HistoryPage:
    records: tuple[HistoryRecord, ...]
    more: bool

    @property
    def next_before(self) -> int | None:
        return self.records[-1].msg_id if self.more and self.records else None


# --- helpers --------------------------------------------------------------------------


def _insert_ignoring_duplicates(connection: Connection, table: Table) -> Insert:
    """The dialect's own INSERT, since ON CONFLICT is not in SQLAlchemy's generic one."""
    keys = [column.name for column in table.primary_key.columns]
    name = connection.dialect.name
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
    raise NotImplementedError(f"cim does not support the {name} database")


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _lock_receivers(connection: Connection, receivers: Iterable[str]) -> None:
    """Serialise cap checks per receiver until commit, on PostgreSQL.

    Under READ COMMITTED two consumers storing for one receiver at once would each
    count only their own new rows and could both pass the cap. SQLite needs nothing:
    ``BEGIN IMMEDIATE`` already lets one writer in at a time. Keys are taken in
    ascending order so that two batches with overlapping receivers cannot deadlock;
    two receivers sharing a key only wait for each other.
    """
    if connection.dialect.name != "postgresql":
        return
    keys = sorted(
        {
            int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)
            for name in receivers
        }
    )
    if not keys:
        return
    # PostgreSQL evaluates a volatile function in the select list after sorting.
    connection.execute(
        text(
            "SELECT pg_advisory_xact_lock(:class, k)"
            " FROM unnest(CAST(:keys AS integer[])) AS k ORDER BY k"
        ),
        {"class": _CAP_LOCK_CLASS, "keys": keys},
    )


def _offline_record(row: Any) -> OfflineRecord:
    return OfflineRecord(
        receiver=row.receiver_uid,
        msg_id=row.msg_id,
        send_time=row.send_time,
        sender=row.sender_uid,
        msg_type=row.msg_type,
        content=row.msg_content,
        group_id=row.group_id,
        payload=bytes(row.payload),
    )


def _history_record(row: Any) -> HistoryRecord:
    return HistoryRecord(
        conversation=row.conversation,
        msg_id=row.msg_id,
        sender=row.sender,
        receiver=row.receiver,
        group_id=row.group_id,
        sent_at=row.sent_at,
        msg_type=row.msg_type,
        payload=bytes(row.payload),
    )


# --- offline messages -----------------------------------------------------------------


def store_offline_txn(
    connection: Connection, records: Sequence[OfflineRecord], max_per_user: int | None = None
) -> int:
    """Store a batch; returns how many rows are new (duplicates are skipped).

    With ``max_per_user``, raises ``OfflineFull`` (rolling the whole batch back) when
    a receiver that gained rows holds more than that afterwards. Counting after the
    insert means re-storing what is already there never trips the cap, even for a
    receiver that is full.
    """
    unique = list({(r.receiver, r.msg_id): r for r in records}.values())
    if not unique:
        return 0
    if max_per_user is not None:
        _lock_receivers(connection, {r.receiver for r in unique})
    statement = _insert_ignoring_duplicates(connection, offline_msgs).returning(
        offline_msgs.c.receiver_uid
    )
    inserted: list[str] = list(
        connection.execute(
            statement,
            [
                {
                    "receiver_uid": r.receiver,
                    "msg_id": r.msg_id,
                    "send_time": r.send_time,
                    "sender_uid": r.sender,
                    "msg_type": r.msg_type,
                    "msg_content": r.content,
                    "group_id": r.group_id,
                    "payload": r.payload,
                }
                for r in unique
            ],
        ).scalars()
    )
    if max_per_user is not None and inserted:
        over: list[str] = []
        for chunk in _chunks(sorted(set(inserted))):
            over.extend(
                connection.execute(
                    select(offline_msgs.c.receiver_uid)
                    .where(offline_msgs.c.receiver_uid.in_(chunk))
                    .group_by(offline_msgs.c.receiver_uid)
                    .having(func.count() > max_per_user)
                    .order_by(offline_msgs.c.receiver_uid)
                ).scalars()
            )
        if over:
            raise OfflineFull(over, max_per_user)
    return len(inserted)


def count_offline_txn(connection: Connection, receiver: str) -> int:
    return int(
        connection.execute(
            select(func.count())
            .select_from(offline_msgs)
            .where(offline_msgs.c.receiver_uid == receiver)
        ).scalar_one()
    )


def _fitting(sizes: Sequence[Any], limit: int, max_bytes: int | None) -> tuple[list[int], bool]:
    """The ids (newest first) of a page from ``(msg_id, size)`` rows, at most ``limit``
    (the rows hold one more, to tell whether more remain) and ``max_bytes``; at least one.
    """
    chosen: list[int] = []
    total = 0
    for msg_id, size in sizes[:limit]:
        cost = int(size) + PAGE_ENTRY_OVERHEAD
        if chosen and max_bytes is not None and total + cost > max_bytes:
            break
        chosen.append(int(msg_id))
        total += cost
    return chosen, len(sizes) > len(chosen)


def offline_page_txn(
    connection: Connection,
    receiver: str,
    before: int | None,
    limit: int,
    max_bytes: int | None = None,
) -> OfflinePage:
    """Every sender's messages for receiver, newest first (design: 方案2, 分页拉取)."""
    table = offline_msgs
    mine = table.c.receiver_uid == receiver
    query = select(table.c.msg_id, func.length(table.c.payload)).where(mine)
    if before is not None:
        query = query.where(table.c.msg_id < before)
    sizes = connection.execute(query.order_by(table.c.msg_id.desc()).limit(limit + 1)).all()
    chosen, more = _fitting(sizes, limit, max_bytes)
    if not chosen:
        return OfflinePage((), False)
    rows = connection.execute(
        select(table).where(mine, table.c.msg_id.in_(chosen)).order_by(table.c.msg_id.desc())
    ).all()
    return OfflinePage(tuple(_offline_record(row) for row in rows), more)


def delete_offline_txn(connection: Connection, receiver: str, msg_ids: Sequence[int]) -> int:
    """Delete what receiver acknowledged; returns how many rows went.

    The receiver is part of the condition, so ids acknowledged by one user can never
    delete another's copy of the same group message.
    """
    deleted = 0
    for chunk in _chunks(sorted(set(msg_ids))):
        result = connection.execute(
            delete(offline_msgs).where(
                offline_msgs.c.receiver_uid == receiver, offline_msgs.c.msg_id.in_(chunk)
            )
        )
        deleted += result.rowcount
    return deleted


def offline_summary_txn(connection: Connection, receiver: str) -> list[SenderCount]:
    """Per-sender counts, the sender with the most recent message first."""
    newest = func.max(offline_msgs.c.msg_id)
    rows = connection.execute(
        select(offline_msgs.c.sender_uid, func.count(), newest)
        .where(offline_msgs.c.receiver_uid == receiver)
        .group_by(offline_msgs.c.sender_uid)
        .order_by(newest.desc())
    ).all()
    return [SenderCount(sender, int(count), int(last)) for sender, count, last in rows]


# --- history --------------------------------------------------------------------------


def archive_txn(connection: Connection, records: Sequence[HistoryRecord]) -> int:
    """Archive a batch; returns how many rows are new (duplicates are skipped)."""
    unique = list({(r.conversation, r.msg_id): r for r in records}.values())
    if not unique:
        return 0
    statement = _insert_ignoring_duplicates(connection, history).returning(history.c.msg_id)
    inserted = connection.execute(
        statement,
        [
            {
                "conversation": r.conversation,
                "msg_id": r.msg_id,
                "sender": r.sender,
                "receiver": r.receiver,
                "group_id": r.group_id,
                "sent_at": r.sent_at,
                "msg_type": r.msg_type,
                "payload": r.payload,
            }
            for r in unique
        ],
    ).all()
    return len(inserted)


def history_page_txn(
    connection: Connection,
    conversation: str,
    before: int | None,
    limit: int,
    max_bytes: int | None = None,
) -> HistoryPage:
    """One conversation, newest first; the caller has checked the reader takes part."""
    ours = history.c.conversation == conversation
    query = select(history.c.msg_id, func.length(history.c.payload)).where(ours)
    if before is not None:
        query = query.where(history.c.msg_id < before)
    sizes = connection.execute(query.order_by(history.c.msg_id.desc()).limit(limit + 1)).all()
    chosen, more = _fitting(sizes, limit, max_bytes)
    if not chosen:
        return HistoryPage((), False)
    rows = connection.execute(
        select(history).where(ours, history.c.msg_id.in_(chosen)).order_by(history.c.msg_id.desc())
    ).all()
    return HistoryPage(tuple(_history_record(row) for row in rows), more)


def purge_history_txn(connection: Connection, cutoff: float, batch_size: int) -> int:
    """Delete at most batch_size rows sent before cutoff, oldest first.

    Bounded so that one transaction never holds locks (or SQLite's single write lock)
    for long; the caller repeats until fewer than batch_size rows go.
    """
    oldest = (
        select(history.c.conversation, history.c.msg_id)
        .where(history.c.sent_at < cutoff)
        .order_by(history.c.sent_at)
        .limit(batch_size)
    )
    result = connection.execute(
        delete(history).where(tuple_(history.c.conversation, history.c.msg_id).in_(oldest))
    )
    return int(result.rowcount)
