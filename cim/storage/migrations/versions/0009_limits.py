"""limits: per-user rate limits an operator raised with cimctl limits

Revision ID: 0009_limits
Revises: 0006_logic
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_limits"
down_revision: str | None = "0008_file_access"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_limits",
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("per_second", sa.Double(), nullable=False),
        sa.Column("burst", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "kind IN ('messages', 'group_posts', 'sos', 'posts', 'logic', 'files')",
            name=op.f("ck_user_limits_kind"),
        ),
        sa.CheckConstraint("per_second >= 0 AND burst >= 1", name=op.f("ck_user_limits_rate")),
        sa.ForeignKeyConstraint(
            ["user_name"],
            ["users.name"],
            name=op.f("fk_user_limits_user_name_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_name", "kind", name=op.f("pk_user_limits")),
    )


def downgrade() -> None:
    op.drop_table("user_limits")
