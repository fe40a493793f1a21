"""Read marks (issue #15): how far each user has read each of its conversations.

A user marks a conversation read up to a seq from any device (READ_R); the mark only
moves forward and never past the conversation's newest seq. ``seq`` is the user's own
mark (its devices' unread counts and the catch-up summary count past it); ``shown_seq``
is what others see (a 1:1 peer's "read up to n", a group sender's "who read it"): it
is the highest seq the user marked while its ``read_receipts`` setting was on, so a read
made with receipts off is never shown, live or at catch-up (marking again once they are
back on shows that mark, even when the user's own mark was already past it).

A mark belongs to the user's reader row (``user_conversations``): leaving a group or
deleting the account takes it (the foreign key cascades). Every function is a ``*_txn``
run through ``Database.run``, returning plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.engine import Connection

from cim.storage.schema import (
    conversations,
    read_marks,
    timeline,
    user_conversations,
    users,
)
from cim.storage.timeline import _insert

__all__ = [
    "MAX_READERS",
    "RECEIPTS_OFF",
    "RECEIPTS_ON",
    "ReadMark",
    "ReadRefused",
    "Readers",
    "mark_read_txn",
    "read_receipts_txn",
    "readers_txn",
]

RECEIPTS_ON = "on"
RECEIPTS_OFF = "off"
MAX_READERS = 1000
"""Names in one answer to "who read it" (the count is always whole)."""


class ReadRefused(Exception):
    """A read mark or a question that cannot be taken; nothing changed.

    ``code``: ``not_found`` (no such conversation, or the message is no longer kept),
    ``forbidden`` (not one of the user's conversations; not the message's sender),
    ``bad_request`` (a seq of 0 or past the conversation's newest)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ReadMark:
    """A user's mark after a READ_R, and what moved."""

    user: str
    conversation: str
    seq: int
    shown_seq: int
    moved: bool
    """The user's own mark went forward (its other devices are told)."""
    shown_moved: bool
    """What others see went forward (a 1:1 peer is told)."""
    last_seq: int
    peer: str | None
    group_id: str | None


@dataclass(frozen=True, slots=True)
class Readers:
    """Who has read one message: members besides its sender whose shown mark reaches it."""

    conversation: str
    seq: int
    readers: tuple[str, ...]
    count: int
    members: int


def read_receipts_txn(connection: Connection, user: str) -> bool:
    """Whether others may see what ``user`` reads (on unless the user turned it off; a
    name without an account, as in the storage tests, is on)."""
    setting = connection.execute(
        select(users.c.read_receipts).where(users.c.name == user)
    ).scalar_one_or_none()
    return setting != RECEIPTS_OFF


def _reader_row(connection: Connection, user: str, conversation: str) -> tuple[Any, int]:
    """(the user's reader row, the conversation's last seq), or ReadRefused."""
    row = connection.execute(
        select(
            user_conversations.c.peer,
            user_conversations.c.group_id,
            user_conversations.c.floor_seq,
            conversations.c.last_seq,
        )
        .join(conversations, conversations.c.key == user_conversations.c.conversation)
        .where(
            user_conversations.c.user_name == user,
            user_conversations.c.conversation == conversation,
        )
    ).first()
    if row is not None:
        return row, int(row.last_seq)
    exists = connection.execute(
        select(conversations.c.key).where(conversations.c.key == conversation)
    ).first()
    if exists is None:
        raise ReadRefused("not_found", "no such conversation")
    raise ReadRefused("forbidden", "not one of your conversations")


def mark_read_txn(
    connection: Connection, user: str, conversation: str, seq: int, now: float
) -> ReadMark:
    """Move ``user``'s mark in ``conversation`` up to ``seq`` (a lower one changes
    nothing); refused past the newest seq, for seq 0, or outside the user's
    conversations. Two devices marking at once both end at the higher mark."""
    row, last_seq = _reader_row(connection, user, conversation)
    if seq < 1:
        raise ReadRefused("bad_request", "seq must be at least 1")
    if seq > last_seq:
        raise ReadRefused(
            "bad_request", f"seq {seq} is past the conversation's newest ({last_seq})"
        )
    mine = and_(read_marks.c.user_name == user, read_marks.c.conversation == conversation)
    before = connection.execute(
        select(read_marks.c.seq, read_marks.c.shown_seq).where(mine)
    ).first()
    old_seq = int(before.seq) if before is not None else 0
    old_shown = int(before.shown_seq) if before is not None else 0
    shown = seq if read_receipts_txn(connection, user) else 0
    statement = _insert(connection, read_marks).values(
        user_name=user, conversation=conversation, seq=seq, shown_seq=shown, read_at=now
    )
    excluded = statement.excluded
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=[read_marks.c.user_name, read_marks.c.conversation],
            set_={
                "seq": case(
                    (excluded.seq > read_marks.c.seq, excluded.seq), else_=read_marks.c.seq
                ),
                "shown_seq": case(
                    (excluded.shown_seq > read_marks.c.shown_seq, excluded.shown_seq),
                    else_=read_marks.c.shown_seq,
                ),
                "read_at": case(
                    (excluded.seq > read_marks.c.seq, excluded.read_at), else_=read_marks.c.read_at
                ),
            },
        )
    )
    after = connection.execute(select(read_marks.c.seq, read_marks.c.shown_seq).where(mine)).one()
    return ReadMark(
        user,
        conversation,
        int(after.seq),
        int(after.shown_seq),
        int(after.seq) > old_seq,
        int(after.shown_seq) > old_shown,
        last_seq,
        row.peer,
        row.group_id,
    )


def readers_txn(connection: Connection, asker: str, conversation: str, seq: int) -> Readers:
    """Who has read message ``seq``: asked by its sender only (a member's own reads are
    its own business until the sender asks). Members who joined after the message are
    not counted, nor those whose receipts were off when they read."""
    _, last_seq = _reader_row(connection, asker, conversation)
    if not 1 <= seq <= last_seq:
        raise ReadRefused("bad_request", f"seq {seq} is not in the conversation (1 to {last_seq})")
    sender = connection.execute(
        select(timeline.c.sender).where(
            timeline.c.conversation == conversation, timeline.c.seq == seq
        )
    ).scalar_one_or_none()
    if sender is None:
        raise ReadRefused("not_found", "that message is no longer kept")
    if sender != asker:
        raise ReadRefused("forbidden", "only the message's sender may ask who read it")
    could_read = and_(
        user_conversations.c.conversation == conversation,
        user_conversations.c.user_name != asker,
        user_conversations.c.floor_seq < seq,
    )
    members = connection.execute(
        select(func.count()).select_from(user_conversations).where(could_read)
    ).scalar_one()
    names = list(
        connection.execute(
            select(read_marks.c.user_name)
            .join(
                user_conversations,
                and_(
                    user_conversations.c.user_name == read_marks.c.user_name,
                    user_conversations.c.conversation == read_marks.c.conversation,
                ),
            )
            .where(could_read, read_marks.c.shown_seq >= seq)
            .order_by(read_marks.c.user_name)
        ).scalars()
    )
    return Readers(conversation, seq, tuple(names[:MAX_READERS]), len(names), int(members))
