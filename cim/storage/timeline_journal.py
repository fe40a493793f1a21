"""Transactions for timelines numbered in memory (the embedded SQLite database, whose
node is its only writer): ``cim.history.journal`` numbers each message on the reactor
thread, journals it, and copies it here in large batches.

``copy_txn`` writes messages that already carry their seq: it renumbers nothing and
is replay-safe (a row already there, by its key or its id, is left as it is), raises
``conversations.last_seq`` to the highest seq written, and writes the reader rows of a
1:1 conversation's first message, the rows ``append_txn`` writes. The reads are what
the numbering and the resend check load once per conversation and sender device.
PostgreSQL (several nodes write it) keeps ``cim.storage.timeline.append_txn``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from cim.storage.schema import conversations, timeline, user_conversations
from cim.storage.timeline import (
    TIMELINE_COLUMNS,
    Appended,
    CopyRow,
    NewMessage,
    _found_again,
    _insert,
    row_of,
)

__all__ = [
    "CopyRow",
    "Numbered",
    "Readers",
    "copy_txn",
    "device_high_txn",
    "found_again_txn",
    "highest_id_txn",
    "last_seq_txn",
    "replay_txn",
    "row_of",
]


class Numbered(NamedTuple):
    """A message numbered by the node: where it goes, and the message."""

    seq: int
    message: NewMessage


Readers = tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=8)
def _copy_sql(paramstyle: str) -> str:
    """The rows as they are, skipped when already there (a replay): ``ON CONFLICT DO
    NOTHING`` without a target covers the key and the unique id alike."""
    mark = "?" if paramstyle == "qmark" else "%s"
    return (
        f"INSERT INTO timeline ({', '.join(TIMELINE_COLUMNS)}) "
        f"VALUES ({', '.join(mark for _ in TIMELINE_COLUMNS)}) ON CONFLICT DO NOTHING"
    )


_RAISE_LAST = (
    "INSERT INTO conversations (key, last_seq) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)"
)
"""Each conversation's ``last_seq`` raised to the highest seq copied, as driver SQL with
plain tuples like the rows (the Core statement's compile and per-row dicts were a
tenth of the copy's Python time). SQLite's two-argument ``max``: the journal, and so
``copy_txn``, is the embedded SQLite database's alone."""


def copy_txn(
    connection: Connection, batch: Sequence[CopyRow], starting: Mapping[str, Readers]
) -> int:
    """Write numbered messages; returns how many were in the batch. ``starting``: the
    readers of the 1:1 conversations whose first message (seq 1) is in the batch."""
    if not batch:
        return 0
    if connection.dialect.name != "sqlite":
        raise ValueError("copy_txn writes the embedded SQLite database only")
    last: dict[str, int] = {}
    readers: dict[tuple[str, str], dict[str, Any]] = {}
    for row in batch:
        conversation, seq = row[0], row[1]
        if seq > last.get(conversation, 0):
            last[conversation] = seq
        if seq == 1:  # the conversation's first message: its readers start
            for user, peer in starting.get(conversation, ()):
                readers[(user, conversation)] = {
                    "user_name": user,
                    "conversation": conversation,
                    "peer": peer,
                    "group_id": None,
                    "floor_seq": 0,
                }
    connection.exec_driver_sql(_RAISE_LAST, sorted(last.items()))
    connection.exec_driver_sql(_copy_sql(connection.dialect.paramstyle), list(batch))
    if readers:
        connection.execute(
            _insert(connection, user_conversations).on_conflict_do_nothing(),
            list(readers.values()),
        )
    return len(batch)


def replay_txn(connection: Connection, batch: Sequence[Numbered]) -> int:
    """Write what an earlier run journaled and may not have copied; returns how many
    were written. A record at or below its conversation's ``last_seq`` was copied
    already (copies commit in journal order, and ``copy_txn`` raises ``last_seq`` in
    the same transaction), and may have been deleted since (an account deleted, the
    retention purge): it is not written again."""
    keys = sorted({item.message.conversation for item in batch})
    last: dict[str, int] = {}
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        rows = connection.execute(
            select(conversations.c.key, conversations.c.last_seq).where(
                conversations.c.key.in_(part)
            )
        )
        last.update((str(key), int(seq)) for key, seq in rows)
    fresh = [item for item in batch if item.seq > last.get(item.message.conversation, 0)]
    starting = {
        item.message.conversation: item.message.readers
        for item in fresh
        if item.seq == 1 and item.message.readers
    }
    return copy_txn(connection, [row_of(item.message, item.seq) for item in fresh], starting)


def last_seq_txn(connection: Connection, conversation: str) -> int:
    """The conversation's last seq (0: no message yet)."""
    last = connection.execute(
        select(conversations.c.last_seq).where(conversations.c.key == conversation)
    ).scalar()
    return int(last or 0)


def device_high_txn(connection: Connection, sender: str, device: str) -> int:
    """The highest client sequence the device ever had appended (0: none): one seek in
    ``ix_timeline_sender``. Not bounded by the dedup window, which only makes it
    higher: a higher mark sends more resends to the full lookup, never fewer."""
    high = connection.execute(
        select(func.max(timeline.c.client_seq)).where(
            timeline.c.sender == sender, timeline.c.sender_device == device
        )
    ).scalar()
    return int(high or 0)


def highest_id_txn(connection: Connection) -> int:
    """The highest message id in the timelines (0: none): one seek in its unique index."""
    return int(connection.execute(select(func.max(timeline.c.msg_id))).scalar() or 0)


def found_again_txn(
    connection: Connection, message: NewMessage, dedup_since: float
) -> Appended | None:
    """The full resend lookup of one message (the rare slow path): by id, or by sender,
    device and client sequence sent since ``dedup_since``."""
    return _found_again(connection, [message], dedup_since).get(message.msg_id)
