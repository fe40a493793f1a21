"""offline: messages kept for receivers who are offline, and the history archive.

Revision ID: 0005_offline
Revises: 0004_files
Create Date: 2026-01-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_offline"
down_revision: str | None = "0004_files"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
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


def downgrade() -> None:
    op.drop_index(op.f("ix_history_sent_at"), table_name="history")
    op.drop_table("history")
    op.drop_table("offline_msgs")
