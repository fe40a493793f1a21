"""file access: files belong to their holders and the conversations they were sent in

Until now any valid token read any file. From here a file is read by its holders
(``file_refs``, now tied to accounts and with ``deleted_at`` for DELETE) and by the
participants of the conversations it was sent in (``file_shares`` for one-to-one
conversations, ``file_group_shares`` for groups, whose current members read it).

So that nobody loses a file they were sent before the upgrade, the shares are filled
in from the media messages still in the history and in the offline boxes. Holdings
and unfinished uploads of accounts that no longer exist are removed (the accounts'
foreign keys would refuse them): their files are purged once nobody else may read them.

Revision ID: 0008_file_access
Revises: 0006_logic
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_file_access"
down_revision: str | None = "0007_contacts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MEDIA_TYPES = (1, 2, 3)  # cim_pb2.IMAGE, VOICE, FILE
_BATCH = 500

_users = sa.table("users", sa.column("name", sa.String))
_groups = sa.table("groups", sa.column("id", sa.String))
_files = sa.table("files", sa.column("id", sa.String))
_file_refs = sa.table("file_refs", sa.column("user_name", sa.String))
_uploads = sa.table("uploads", sa.column("user_name", sa.String))
_history = sa.table(
    "history",
    sa.column("sender", sa.String),
    sa.column("receiver", sa.String),
    sa.column("group_id", sa.String),
    sa.column("sent_at", sa.Double),
    sa.column("msg_type", sa.Integer),
    sa.column("payload", sa.LargeBinary),
)
_offline = sa.table(
    "offline_msgs",
    sa.column("sender_uid", sa.String),
    sa.column("receiver_uid", sa.String),
    sa.column("group_id", sa.String),
    sa.column("send_time", sa.Double),
    sa.column("msg_type", sa.Integer),
    sa.column("payload", sa.LargeBinary),
)


def upgrade() -> None:
    bind = op.get_bind()
    known = sa.select(_users.c.name)
    bind.execute(sa.delete(_file_refs).where(_file_refs.c.user_name.not_in(known)))
    bind.execute(sa.delete(_uploads).where(_uploads.c.user_name.not_in(known)))
    with op.batch_alter_table("file_refs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.Double(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_file_refs_user_name_users"),
            "users",
            ["user_name"],
            ["name"],
            ondelete="CASCADE",
        )
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.create_foreign_key(
            batch_op.f("fk_uploads_user_name_users"),
            "users",
            ["user_name"],
            ["name"],
            ondelete="CASCADE",
        )
    op.create_table(
        "file_shares",
        sa.Column("file_id", sa.String(length=22), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=False),
        sa.Column("shared_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_file_shares_file_id_files"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_name"],
            ["users.name"],
            name=op.f("fk_file_shares_user_name_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("file_id", "user_name", "peer", name=op.f("pk_file_shares")),
    )
    with op.batch_alter_table("file_shares", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_file_shares_user_name"), ["user_name"], unique=False)
    op.create_table(
        "file_group_shares",
        sa.Column("file_id", sa.String(length=22), nullable=False),
        sa.Column("group_id", sa.String(length=26), nullable=False),
        sa.Column("shared_by", sa.String(length=64), nullable=False),
        sa.Column("shared_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"],
            ["files.id"],
            name=op.f("fk_file_group_shares_file_id_files"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name=op.f("fk_file_group_shares_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("file_id", "group_id", name=op.f("pk_file_group_shares")),
    )
    _backfill_shares(bind)


def downgrade() -> None:
    op.drop_table("file_group_shares")
    with op.batch_alter_table("file_shares", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_file_shares_user_name"))
    op.drop_table("file_shares")
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_uploads_user_name_users"), type_="foreignkey")
    with op.batch_alter_table("file_refs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_file_refs_user_name_users"), type_="foreignkey")
        batch_op.drop_column("deleted_at")


# --- shares from the messages sent before the upgrade -----------------------------------


def _backfill_shares(bind: sa.engine.Connection) -> None:
    """Who was sent which file, from the media messages the database still holds."""
    from google.protobuf.message import DecodeError

    from cim.protocols import cim_pb2

    # (file, user, peer) and (file, group) -> when first sent; the group's sender.
    direct: dict[tuple[str, str, str], float] = {}
    grouped: dict[tuple[str, str], tuple[float, str]] = {}
    sources = (
        sa.select(
            _history.c.sender,
            _history.c.receiver,
            _history.c.group_id,
            _history.c.sent_at,
            _history.c.payload,
        ).where(_history.c.msg_type.in_(_MEDIA_TYPES)),
        sa.select(
            _offline.c.sender_uid,
            _offline.c.receiver_uid,
            _offline.c.group_id,
            _offline.c.send_time,
            _offline.c.payload,
        ).where(_offline.c.msg_type.in_(_MEDIA_TYPES)),
    )
    for query in sources:
        # Streamed: a history may hold millions of media messages.
        rows = bind.execute(query.execution_options(yield_per=_BATCH))
        for sender, receiver, group_id, sent_at, payload in rows:
            message = cim_pb2.Message()
            try:
                message.ParseFromString(payload)
            except DecodeError:  # a damaged row shares nothing
                continue
            file_id = message.media.file_id
            if not file_id or len(file_id) > 22:
                continue
            when = float(sent_at or 0.0)
            if group_id:
                earlier = grouped.get((file_id, group_id))
                if earlier is None or when < earlier[0]:
                    grouped[(file_id, group_id)] = (when, sender)
            elif receiver:
                for key in ((file_id, sender, receiver), (file_id, receiver, sender)):
                    direct[key] = min(when, direct.get(key, when))
    if not direct and not grouped:
        return
    files = _existing(bind, _files.c.id, {key[0] for key in [*direct, *grouped]})
    users = _existing(bind, _users.c.name, {key[1] for key in direct})
    groups = _existing(bind, _groups.c.id, {key[1] for key in grouped})
    shares = sa.table(
        "file_shares",
        sa.column("file_id"),
        sa.column("user_name"),
        sa.column("peer"),
        sa.column("shared_at"),
    )
    group_shares = sa.table(
        "file_group_shares",
        sa.column("file_id"),
        sa.column("group_id"),
        sa.column("shared_by"),
        sa.column("shared_at"),
    )
    _insert(
        bind,
        shares,
        [
            {"file_id": f, "user_name": user, "peer": peer, "shared_at": when}
            for (f, user, peer), when in sorted(direct.items())
            if f in files and user in users
        ],
    )
    _insert(
        bind,
        group_shares,
        [
            {"file_id": f, "group_id": group_id, "shared_by": sender, "shared_at": when}
            for (f, group_id), (when, sender) in sorted(grouped.items())
            if f in files and group_id in groups
        ],
    )


def _existing(
    bind: sa.engine.Connection, column: sa.ColumnClause[str], values: set[str]
) -> set[str]:
    found: set[str] = set()
    ordered = sorted(values)
    for start in range(0, len(ordered), _BATCH):
        batch = ordered[start : start + _BATCH]
        found.update(bind.execute(sa.select(column).where(column.in_(batch))).scalars())
    return found


def _insert(
    bind: sa.engine.Connection, table: sa.TableClause, rows: Iterable[dict[str, object]]
) -> None:
    pending = list(rows)
    for start in range(0, len(pending), _BATCH):
        bind.execute(sa.insert(table), pending[start : start + _BATCH])
