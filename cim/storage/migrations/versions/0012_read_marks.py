"""read marks: how far each user has read each of its conversations (issue #15)

``read_marks`` holds a user's mark per conversation (any device moves it, never back)
and the part others may see (``shown_seq``, moved only while read receipts are on);
``users.read_receipts`` is the account's setting (NULL: on). A mark goes with its
reader row in ``user_conversations`` (ON DELETE CASCADE). Nothing to carry over: no
mark existed before.

Revision ID: 0012_read_marks
Revises: 0011_changes
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_read_marks"
down_revision: str | None = "0011_changes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("read_receipts", sa.String(length=8), nullable=True))
        batch_op.create_check_constraint("read_receipts", "read_receipts IN ('on', 'off')")
    op.create_table(
        "read_marks",
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("conversation", sa.String(length=387), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("shown_seq", sa.BigInteger(), nullable=False),
        sa.Column("read_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_name", "conversation"],
            ["user_conversations.user_name", "user_conversations.conversation"],
            name=op.f("fk_read_marks_user_name_user_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_name", "conversation", name=op.f("pk_read_marks")),
    )


def downgrade() -> None:
    op.drop_table("read_marks")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint("ck_users_read_receipts", type_="check")
        batch_op.drop_column("read_receipts")
