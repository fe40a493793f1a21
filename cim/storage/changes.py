"""Recall and edit in the timelines (#15): one transaction checks the change, appends
its entry and rewrites what is stored.

A change is an entry of its own in the message's conversation (numbered by
``append_txn`` like any message, its ``replaces`` column naming the message), so every
device gets it the way it gets messages: live, or past its cursor at catch-up. The
same transaction rewrites the stored message, so history and later pages show the
result without replaying anything: a recall keeps the row (its place in the timeline,
who sent it when) and removes its text, media and location, and the text of the
message's earlier edit entries too; an edit stores the newest text with ``edited`` set.
The timeline row is the only stored copy of a message (no other archive holds it), so
nothing else keeps what a recall removed; ``[archive] retention_days`` purges the
rewritten row and its entries by age like any other.

Every check is made inside the transaction, on the row read ``FOR UPDATE``
(PostgreSQL; SQLite has one writer at a time), so two changes of one message (two
nodes, two devices) take turns and the second sees the first: an edit never brings
back the text of a message recalled meanwhile. A refusal raises ``ChangeRefused`` and
changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from cim.protocols import cim_pb2
from cim.storage.group_rows import ADMIN, OWNER
from cim.storage.schema import group_members, timeline
from cim.storage.timeline import Appended, NewMessage, append_txn

__all__ = [
    "NOT_TEXT",
    "NOT_YOURS",
    "RECALLED",
    "TOO_LATE",
    "UNKNOWN_MESSAGE",
    "ChangeAsked",
    "ChangeMade",
    "ChangeRefused",
    "change_txn",
]

RECALL = cim_pb2.RECALL
EDIT = cim_pb2.EDIT

UNKNOWN_MESSAGE = "unknown_message"
NOT_YOURS = "not_yours"
TOO_LATE = "too_late"
NOT_TEXT = "not_text"
RECALLED = "recalled"


class ChangeRefused(Exception):
    """The change cannot be made; ``reason`` is the ERROR's machine-readable reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ChangeAsked:
    """A CHANGE_R as the node took it: who (the connection's user and device), which
    message, what, the entry's server id, and the node's time and windows."""

    actor: str
    device: str
    msg_id: int
    kind: int
    text: str
    entry_id: int
    now: float
    recall_window: float
    edit_window: float


@dataclass(frozen=True, slots=True)
class ChangeMade:
    """The entry (numbered, ``conversation`` and ``seq`` set) and the message as stored
    now; ``parties``: a 1:1 conversation's two users (a group's members are the
    group's)."""

    entry: cim_pb2.Message
    appended: Appended
    changed: cim_pb2.Message
    parties: tuple[str, ...]


def _unknown() -> ChangeRefused:
    # Not a participant gets the same answer as no such message: ids tell nothing.
    return ChangeRefused(UNKNOWN_MESSAGE, "no such message in your conversations")


def _admin(connection: Connection, group_id: str, actor: str) -> bool:
    """Whether ``actor`` is an owner or admin of the group; not a member: unknown."""
    role = connection.execute(
        select(group_members.c.role).where(
            group_members.c.group_id == group_id, group_members.c.user_name == actor
        )
    ).scalar()
    if role is None:
        raise _unknown()
    return role in (OWNER, ADMIN)


def _check(asked: ChangeAsked, stored: cim_pb2.Message, sent_at: float, admin: bool) -> None:
    if stored.recalled:
        raise ChangeRefused(RECALLED, "the message was recalled")
    mine = getattr(stored, "from") == asked.actor
    age = asked.now - sent_at
    if asked.kind == RECALL:
        if not mine and not admin:
            raise ChangeRefused(
                NOT_YOURS, "only its sender (or a group's owner or admin) can recall a message"
            )
        if not admin and age > asked.recall_window:
            raise ChangeRefused(
                TOO_LATE,
                f"a message can be recalled for {asked.recall_window:g} s after it was sent",
            )
        return
    if not mine:
        raise ChangeRefused(NOT_YOURS, "only its sender can edit a message")
    if stored.type != cim_pb2.TEXT:
        raise ChangeRefused(NOT_TEXT, "only a text message can be edited")
    if age > asked.edit_window:
        raise ChangeRefused(
            TOO_LATE, f"a message can be edited for {asked.edit_window:g} s after it was sent"
        )


def _rewrite(connection: Connection, msg_id: int, message: cim_pb2.Message) -> None:
    payload = message.SerializeToString(deterministic=True)
    connection.execute(
        update(timeline)
        .where(timeline.c.msg_id == msg_id)
        .values(payload=payload, size=len(payload))
    )


def _removed(message: cim_pb2.Message, asked: ChangeAsked, at_ms: int) -> None:
    """What a recall leaves of a stored message or edit entry: who, when, where."""
    message.text = ""
    message.ClearField("media")
    message.ClearField("location")
    message.edited = False
    message.recalled = True
    message.changed_at_ms = at_ms
    message.changed_by = asked.actor


def change_txn(connection: Connection, asked: ChangeAsked) -> ChangeMade:
    """Check, append the entry, rewrite the stored message (see the module)."""
    row = connection.execute(
        select(
            timeline.c.conversation,
            timeline.c.seq,
            timeline.c.sent_at,
            timeline.c.payload,
            timeline.c.replaces,
        )
        .where(timeline.c.msg_id == asked.msg_id)
        .with_for_update()
    ).first()
    if row is None or row.replaces is not None:
        raise _unknown()  # a change entry is not changed itself
    stored = cim_pb2.Message.FromString(bytes(row.payload))
    sender = getattr(stored, "from")
    if stored.group:
        admin = _admin(connection, stored.group, asked.actor)
        parties: tuple[str, ...] = ()
        peer = ""
    elif asked.actor in (sender, stored.to):
        admin = False
        parties = tuple(dict.fromkeys((sender, stored.to)))
        peer = stored.to if asked.actor == sender else sender
    else:
        raise _unknown()
    _check(asked, stored, float(row.sent_at), admin)

    at_ms = int(asked.now * 1000)
    entry = cim_pb2.Message(
        id=asked.entry_id,
        to=peer,
        group=stored.group,
        type=cim_pb2.TEXT,
        device=asked.device,
        sent_at_ms=at_ms,
        change=asked.kind,  # type: ignore[arg-type]
        replaces=asked.msg_id,
        replaces_seq=int(row.seq),
        changed_at_ms=at_ms,
        changed_by=asked.actor,
    )
    setattr(entry, "from", asked.actor)
    if asked.kind == EDIT:
        entry.text = asked.text
    payload = entry.SerializeToString(deterministic=True)
    new = NewMessage(
        row.conversation, asked.entry_id, asked.actor, asked.device, 0, asked.now, payload
    )
    appended = append_txn(connection, [new])[asked.entry_id]
    connection.execute(
        update(timeline).where(timeline.c.msg_id == asked.entry_id).values(replaces=asked.msg_id)
    )

    if asked.kind == RECALL:
        _removed(stored, asked, at_ms)
        # The earlier edits of the message carry its text too: out with it.
        for edit in connection.execute(
            select(timeline.c.msg_id, timeline.c.payload).where(
                timeline.c.replaces == asked.msg_id, timeline.c.msg_id != asked.entry_id
            )
        ).all():
            earlier = cim_pb2.Message.FromString(bytes(edit.payload))
            if earlier.text:
                earlier.text = ""
                _rewrite(connection, int(edit.msg_id), earlier)
    else:
        stored.text = asked.text
        stored.edited = True
        stored.changed_at_ms = at_ms
    _rewrite(connection, asked.msg_id, stored)

    entry.conversation = stored.conversation = appended.conversation
    entry.seq = appended.seq
    stored.seq = int(row.seq)
    if entry.group:
        entry.group_seq = entry.seq
        stored.group_seq = stored.seq
    return ChangeMade(entry, appended, stored, parties)
