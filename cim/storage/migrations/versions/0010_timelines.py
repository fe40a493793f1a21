"""timelines: conversations numbered by seq, read through cursors (issue #14)

``history`` (every archived message) and ``offline_msgs`` (a copy per receiver who was
offline) become one ``timeline`` per conversation, each message once, numbered 1, 2,
3, ... in ``msg_id`` order (server ids are time-ordered). A message in both tables, or
a group message stored for several members, is one row.

What a receiver had not pulled stays unread: each user's ``floor_seq`` in a
conversation is set just below its oldest stored copy there (or at ``last_seq`` when it
had none), so no device of it has read past that point and everything later is
unread; nothing already delivered before the upgrade shows up as new.

Revision ID: 0010_timelines
Revises: 0009_limits
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import sqlalchemy as sa
from alembic import op
from google.protobuf.message import DecodeError

from cim.protocols import cim_pb2

revision: str = "0010_timelines"
down_revision: str | None = "0009_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 500
_HISTORY = sa.table(
    "history",
    sa.column("conversation", sa.String),
    sa.column("msg_id", sa.BigInteger),
    sa.column("sender", sa.String),
    sa.column("receiver", sa.String),
    sa.column("group_id", sa.String),
    sa.column("sent_at", sa.Double),
    sa.column("msg_type", sa.Integer),
    sa.column("payload", sa.LargeBinary),
)
_OFFLINE = sa.table(
    "offline_msgs",
    sa.column("receiver_uid", sa.String),
    sa.column("msg_id", sa.BigInteger),
    sa.column("send_time", sa.Double),
    sa.column("sender_uid", sa.String),
    sa.column("msg_type", sa.Integer),
    sa.column("msg_content", sa.Text),
    sa.column("group_id", sa.String),
    sa.column("payload", sa.LargeBinary),
)
_MEMBERS = sa.table("group_members", sa.column("group_id", sa.String), sa.column("user_name"))
_GROUPS = sa.table("groups", sa.column("id", sa.String))


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace(":", "%3A")


def _unescape(text: str) -> str:
    return text.replace("%3A", ":").replace("%25", "%")


def _direct(a: str, b: str) -> str:
    """cim.history.store.direct_conversation as of this revision (kept here on purpose:
    a migration must not change when the code does)."""
    first, second = sorted((a, b))
    return f"d:{_escape(first)}:{_escape(second)}"


class _Row(NamedTuple):
    msg_id: int
    sender: str
    sent_at: float
    payload: bytes


def _device_and_seq(payload: bytes) -> tuple[str, int]:
    try:
        message = cim_pb2.Message.FromString(payload)
    except DecodeError:
        return "", 0
    return message.device[:64], min(message.client_seq, (1 << 63) - 1)


def _create_tables() -> None:
    op.create_table(
        "conversations",
        sa.Column("key", sa.String(length=387), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_conversations")),
    )
    op.create_table(
        "timeline",
        sa.Column("conversation", sa.String(length=387), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("msg_id", sa.BigInteger(), nullable=False),
        sa.Column("sender", sa.String(length=64), nullable=False),
        sa.Column("sender_device", sa.String(length=64), nullable=False),
        sa.Column("client_seq", sa.BigInteger(), nullable=False),
        sa.Column("sent_at", sa.Double(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("conversation", "seq", name=op.f("pk_timeline")),
        sa.UniqueConstraint("msg_id", name=op.f("uq_timeline_msg_id")),
    )
    op.create_index(
        op.f("ix_timeline_sender"),
        "timeline",
        ["sender", "sender_device", "client_seq"],
        unique=False,
    )
    op.create_index(op.f("ix_timeline_sent_at"), "timeline", ["sent_at"], unique=False)
    op.create_table(
        "user_conversations",
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("conversation", sa.String(length=387), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=True),
        sa.Column("group_id", sa.String(length=26), nullable=True),
        sa.Column("floor_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_name", "conversation", name=op.f("pk_user_conversations")),
    )
    op.create_table(
        "cursors",
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("conversation", sa.String(length=387), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_name", "device", "conversation", name=op.f("pk_cursors")),
    )


def upgrade() -> None:
    _create_tables()
    bind = op.get_bind()
    timeline = sa.table(
        "timeline",
        *(
            sa.column(name)
            for name in (
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
        ),
    )
    # The stored copies, one entry per message per conversation, and who was owed each.
    stored: dict[str, dict[int, _Row]] = defaultdict(dict)
    owed: dict[tuple[str, str], set[int]] = defaultdict(set)
    groups_of: dict[str, str] = {}
    for row in bind.execute(sa.select(_OFFLINE)):
        if row.group_id:
            key = f"g:{row.group_id}"
            groups_of[key] = row.group_id
        else:
            key = _direct(row.sender_uid, row.receiver_uid)
        stored[key][row.msg_id] = _Row(
            row.msg_id, row.sender_uid, row.send_time, bytes(row.payload)
        )
        owed[(row.receiver_uid, key)].add(row.msg_id)
    old_keys = {
        ("d:" + key[2:] if key.startswith("u:") else key): key
        for key in bind.execute(sa.select(_HISTORY.c.conversation).distinct()).scalars()
    }
    last: dict[str, int] = {}
    seq_of: dict[int, int] = {}
    for key in sorted(set(old_keys) | set(stored)):
        rows = dict(stored.get(key, {}))
        if key in old_keys:
            for old in bind.execute(
                sa.select(_HISTORY).where(_HISTORY.c.conversation == old_keys[key])
            ):
                rows[old.msg_id] = _Row(old.msg_id, old.sender, old.sent_at, bytes(old.payload))
                if old.group_id:
                    groups_of[key] = old.group_id
        # A message under two conversations' keys (never written so) stays in the first.
        ordered = sorted(
            (kept for kept in rows.values() if kept.msg_id not in seq_of), key=lambda r: r.msg_id
        )
        values = []
        for seq, kept in enumerate(ordered, start=1):
            seq_of[kept.msg_id] = seq
            device, client_seq = _device_and_seq(kept.payload)
            values.append(
                {
                    "conversation": key,
                    "seq": seq,
                    "msg_id": kept.msg_id,
                    "sender": kept.sender,
                    "sender_device": device,
                    "client_seq": client_seq,
                    "sent_at": kept.sent_at,
                    "payload": kept.payload,
                    "size": len(kept.payload),
                }
            )
            last[key] = seq
        for start in range(0, len(values), _CHUNK):
            bind.execute(timeline.insert(), values[start : start + _CHUNK])
    for group_id in bind.execute(sa.select(_GROUPS.c.id)).scalars():
        groups_of[f"g:{group_id}"] = group_id
        last.setdefault(f"g:{group_id}", 0)
    conversations = sa.table("conversations", sa.column("key"), sa.column("last_seq"))
    rows_ = [{"key": key, "last_seq": seq} for key, seq in sorted(last.items())]
    for start in range(0, len(rows_), _CHUNK):
        bind.execute(conversations.insert(), rows_[start : start + _CHUNK])
    members: dict[str, list[str]] = defaultdict(list)
    for group_id, user in bind.execute(sa.select(_MEMBERS.c.group_id, _MEMBERS.c.user_name)):
        members[f"g:{group_id}"].append(user)

    def floor(user: str, key: str) -> int:
        unread = [seq_of[m] for m in owed.get((user, key), ()) if m in seq_of]
        return min(unread) - 1 if unread else last.get(key, 0)

    readers = []
    for key in sorted(last):
        if key.startswith("g:"):
            for user in sorted(set(members.get(key, ()))):
                readers.append(
                    {
                        "user_name": user,
                        "conversation": key,
                        "peer": None,
                        "group_id": groups_of[key],
                        "floor_seq": floor(user, key),
                    }
                )
            continue
        first, second = (_unescape(part) for part in key[2:].split(":"))
        for user, peer in (
            ((first, second), (second, first)) if first != second else ((first, first),)
        ):
            readers.append(
                {
                    "user_name": user,
                    "conversation": key,
                    "peer": peer,
                    "group_id": None,
                    "floor_seq": floor(user, key),
                }
            )
    user_conversations = sa.table(
        "user_conversations",
        *(sa.column(n) for n in ("user_name", "conversation", "peer", "group_id", "floor_seq")),
    )
    for start in range(0, len(readers), _CHUNK):
        bind.execute(user_conversations.insert(), readers[start : start + _CHUNK])
    op.drop_index(op.f("ix_history_sent_at"), table_name="history")
    op.drop_table("history")
    op.drop_table("offline_msgs")


def downgrade() -> None:
    """Back to 0009: every timeline message into ``history``; ``offline_msgs`` comes back
    empty (what was unread is not told apart any more: read it as history)."""
    op.create_table(
        "offline_msgs",
        sa.Column("receiver_uid", sa.String(length=64), nullable=False),
        sa.Column("msg_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("send_time", sa.Double(), nullable=False),
        sa.Column("sender_uid", sa.String(length=64), nullable=False),
        sa.Column("msg_type", sa.Integer(), nullable=False),
        sa.Column("msg_content", sa.Text(), nullable=False),
        sa.Column("group_id", sa.String(length=26), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("receiver_uid", "msg_id", name=op.f("pk_offline_msgs")),
    )
    op.create_table(
        "history",
        sa.Column("conversation", sa.String(length=387), nullable=False),
        sa.Column("msg_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("sender", sa.String(length=64), nullable=False),
        sa.Column("receiver", sa.String(length=64), nullable=True),
        sa.Column("group_id", sa.String(length=26), nullable=True),
        sa.Column("sent_at", sa.Double(), nullable=False),
        sa.Column("msg_type", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("conversation", "msg_id", name=op.f("pk_history")),
    )
    op.create_index(op.f("ix_history_sent_at"), "history", ["sent_at"], unique=False)
    bind = op.get_bind()
    timeline = sa.table(
        "timeline",
        *(sa.column(n) for n in ("conversation", "msg_id", "sender", "sent_at", "payload")),
    )
    rows = []
    for row in bind.execute(sa.select(timeline)):
        message = cim_pb2.Message.FromString(bytes(row.payload))
        key = row.conversation
        rows.append(
            {
                "conversation": "u:" + key[2:] if key.startswith("d:") else key,
                "msg_id": row.msg_id,
                "sender": row.sender,
                "receiver": message.to or None,
                "group_id": message.group or None,
                "sent_at": row.sent_at,
                "msg_type": int(message.type),
                "payload": bytes(row.payload),
            }
        )
    for start in range(0, len(rows), _CHUNK):
        bind.execute(_HISTORY.insert(), rows[start : start + _CHUNK])
    op.drop_table("cursors")
    op.drop_table("user_conversations")
    op.drop_index(op.f("ix_timeline_sent_at"), table_name="timeline")
    op.drop_index(op.f("ix_timeline_sender"), table_name="timeline")
    op.drop_table("timeline")
    op.drop_table("conversations")
