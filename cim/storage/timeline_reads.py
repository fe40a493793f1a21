"""Reading the timelines: a device's summary, pages past its read point (its cursor,
the user's floor and read mark), pages of one conversation by seq (history and gap
fills), the unread count, the retention purge.

The writing side (appends, readers, cursors) and the records are ``cim.storage.timeline``.
Every function is a ``*_txn`` run through ``Database.run``, returning plain data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from cim.message_ids import first_id_at
from cim.storage.schema import (
    conversations,
    cursors,
    read_marks,
    timeline,
    user_conversations,
)
from cim.storage.timeline import (
    _KEYS_PER_READ,
    ConversationState,
    TimelinePage,
    TimelineRecord,
    _any_of,
    enrol_device_txn,
)

__all__ = [
    "PAGE_ENTRY_OVERHEAD",
    "conversation_page_txn",
    "purge_timeline_txn",
    "summary_txn",
    "unread_count_txn",
    "unread_page_txn",
]

PAGE_ENTRY_OVERHEAD = 6
"""Bytes a message costs in a page beyond its serialized size: its field tag and
length prefix (a varint of at most 5 bytes)."""


def _record(row: Any) -> TimelineRecord:
    return TimelineRecord(row.conversation, row.seq, row.msg_id, row.sent_at, bytes(row.payload))


def _fitting(sizes: Sequence[Any], limit: int, max_bytes: int | None) -> tuple[list[Any], bool]:
    """The keys (newest first) of a page from ``(key, size)`` rows, at most ``limit``
    (the rows hold one more, to tell whether more remain) and ``max_bytes``; at least one.
    """
    chosen: list[Any] = []
    total = 0
    for key, size in sizes[:limit]:
        cost = int(size) + PAGE_ENTRY_OVERHEAD
        if chosen and max_bytes is not None and total + cost > max_bytes:
            break
        chosen.append(key)
        total += cost
    return chosen, len(sizes) > len(chosen)


# --- reading --------------------------------------------------------------------------


def _read_point(floor: int, cursor: int | None, read: int | None = None) -> int:
    """Where unread begins for a device: past its cursor, the user's floor (a group
    joined late) and the user's read mark, whichever is highest."""
    return max(int(floor), int(cursor or 0), int(read or 0))


_OWN_MARK = and_(
    read_marks.c.user_name == user_conversations.c.user_name,
    read_marks.c.conversation == user_conversations.c.conversation,
)
"""The user's own read mark in a conversation (outer-joined: maybe none)."""


def summary_txn(connection: Connection, user: str, device: str) -> list[ConversationState]:
    """Every conversation of the user as ``device`` sees it, newest activity first
    (design: 优化方案1): its unread count, read point, newest unread message, the user's
    read mark and (a 1:1) how far the peer has read, as the peer shows it. A device new
    to the account is enrolled first (``enrol_device_txn``)."""
    enrol_device_txn(connection, user, device)
    mine = and_(
        cursors.c.user_name == user_conversations.c.user_name,
        cursors.c.device == device,
        cursors.c.conversation == user_conversations.c.conversation,
    )
    peer_marks = read_marks.alias("peer_marks")
    rows = connection.execute(
        select(
            user_conversations.c.conversation,
            user_conversations.c.peer,
            user_conversations.c.group_id,
            user_conversations.c.floor_seq,
            conversations.c.last_seq,
            cursors.c.seq,
            read_marks.c.seq.label("read_seq"),
            peer_marks.c.shown_seq.label("peer_read"),
        )
        .join(conversations, conversations.c.key == user_conversations.c.conversation)
        .outerjoin(cursors, mine)
        .outerjoin(read_marks, _OWN_MARK)
        .outerjoin(
            peer_marks,
            and_(
                peer_marks.c.user_name == user_conversations.c.peer,
                peer_marks.c.conversation == user_conversations.c.conversation,
            ),
        )
        .where(user_conversations.c.user_name == user)
    ).all()
    points = {row.conversation: _read_point(row.floor_seq, row.seq, row.read_seq) for row in rows}
    unread = [
        (row.conversation, int(row.last_seq))
        for row in rows
        if row.last_seq > points[row.conversation]
    ]
    newest: dict[str, TimelineRecord] = {}
    for start in range(0, len(unread), _KEYS_PER_READ):
        chunk = unread[start : start + _KEYS_PER_READ]
        for row in connection.execute(
            select(timeline).where(_any_of((timeline.c.conversation, timeline.c.seq), chunk))
        ):
            newest[row.conversation] = _record(row)
    states = [
        ConversationState(
            row.conversation,
            row.peer,
            row.group_id,
            int(row.last_seq),
            points[row.conversation],
            newest.get(row.conversation),
            int(row.read_seq or 0),
            int(row.peer_read or 0),
        )
        for row in rows
    ]
    states.sort(
        key=lambda s: (s.newest.msg_id if s.newest is not None else 0, s.last_seq), reverse=True
    )
    return states


def _page(
    connection: Connection, sizes: Sequence[Any], limit: int, max_bytes: int | None, by_id: bool
) -> TimelinePage:
    chosen, more = _fitting(sizes, limit, max_bytes)
    if not chosen:
        return TimelinePage((), False)
    condition: ColumnElement[bool]
    if by_id:
        condition = timeline.c.msg_id.in_(chosen)
        order = timeline.c.msg_id.desc()
    else:
        # One conversation's page: its key and the seqs (an index range lookup).
        condition = and_(
            timeline.c.conversation == chosen[0][0],
            timeline.c.seq.in_([seq for _, seq in chosen]),
        )
        order = timeline.c.seq.desc()
    records = tuple(
        _record(row)
        for row in connection.execute(select(timeline).where(condition).order_by(order))
    )
    next_before = 0
    if more and records:
        next_before = records[-1].msg_id if by_id else records[-1].seq
    return TimelinePage(records, more, next_before)


def conversation_page_txn(
    connection: Connection,
    conversation: str,
    before: int | None,
    after: int,
    limit: int,
    max_bytes: int | None = None,
) -> TimelinePage:
    """One conversation by seq, newest first, only ``after < seq < before``: history,
    a gap fill, or the unread past a read point. The caller checked the reader."""
    query = select(timeline.c.seq, timeline.c.size).where(
        timeline.c.conversation == conversation, timeline.c.seq > after
    )
    if before is not None:
        query = query.where(timeline.c.seq < before)
    sizes = connection.execute(query.order_by(timeline.c.seq.desc()).limit(limit + 1)).all()
    keyed = [((conversation, seq), size) for seq, size in sizes]
    return _page(connection, keyed, limit, max_bytes, by_id=False)


def unread_page_txn(
    connection: Connection,
    user: str,
    device: str,
    conversation: str | None,
    before: int | None,
    limit: int,
    max_bytes: int | None = None,
) -> TimelinePage:
    """What ``device`` has not read: of one conversation (by seq; ``before`` a seq) or
    across all of the user's (by message id; ``before`` an id), newest first. A device
    new to the account is enrolled first (``enrol_device_txn``)."""
    enrol_device_txn(connection, user, device)
    mine = and_(
        cursors.c.user_name == user,
        cursors.c.device == device,
        cursors.c.conversation == user_conversations.c.conversation,
    )
    if conversation:
        point = connection.execute(
            select(user_conversations.c.floor_seq, cursors.c.seq, read_marks.c.seq.label("read"))
            .outerjoin(cursors, mine)
            .outerjoin(read_marks, _OWN_MARK)
            .where(
                user_conversations.c.user_name == user,
                user_conversations.c.conversation == conversation,
            )
        ).first()
        if point is None:
            return TimelinePage((), False)
        return conversation_page_txn(
            connection,
            conversation,
            before,
            _read_point(point.floor_seq, point.seq, point.read),
            limit,
            max_bytes,
        )
    query = (
        select(timeline.c.msg_id, timeline.c.size)
        .join(
            user_conversations,
            and_(
                user_conversations.c.user_name == user,
                user_conversations.c.conversation == timeline.c.conversation,
            ),
        )
        .outerjoin(cursors, mine)
        .outerjoin(read_marks, _OWN_MARK)
        .where(
            timeline.c.seq > user_conversations.c.floor_seq,
            or_(cursors.c.seq.is_(None), timeline.c.seq > cursors.c.seq),
            or_(read_marks.c.seq.is_(None), timeline.c.seq > read_marks.c.seq),
        )
    )
    if before is not None:
        query = query.where(timeline.c.msg_id < before)
    sizes = connection.execute(query.order_by(timeline.c.msg_id.desc()).limit(limit + 1)).all()
    return _page(connection, sizes, limit, max_bytes, by_id=True)


def purge_timeline_txn(connection: Connection, cutoff: float, batch_size: int) -> int:
    """Delete at most batch_size messages taken before cutoff, oldest first; the
    conversations keep their ``last_seq``, so no number is ever given again.

    By msg_id, whose high bits are the node's time when it took the message (the
    time ``sent_at`` holds too): its unique index serves the purge, and ``sent_at``
    needs none of its own for every message to write (migration 0014)."""
    oldest = (
        select(timeline.c.msg_id)
        .where(timeline.c.msg_id < first_id_at(int(cutoff * 1000)))
        .order_by(timeline.c.msg_id)
        .limit(batch_size)
    )
    ids = list(connection.execute(oldest).scalars())
    if not ids:
        return 0
    result = connection.execute(delete(timeline).where(timeline.c.msg_id.in_(ids)))
    return int(result.rowcount)


def unread_count_txn(connection: Connection, user: str, device: str) -> int:
    """Messages ``device`` has not read, all conversations (for tests and tools)."""
    return sum(state.unread for state in summary_txn(connection, user, device))
