"""timeline indexes: retention by msg_id, a partial index on replaces (issue #14)

Every message wrote six B-trees in SQLite (the table, its key, msg_id, sender,
sent_at, replaces). The purge now goes by msg_id, whose high bits are the accept
time, so ``sent_at`` needs no index; only change entries have ``replaces``, so its
index is partial and an ordinary message does not write it.

Revision ID: 0014_timeline_indexes
Revises: 0013_push
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_timeline_indexes"
down_revision: str | None = "0013_push"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOT_NULL = sa.text("replaces IS NOT NULL")


def upgrade() -> None:
    op.drop_index(op.f("ix_timeline_sent_at"), table_name="timeline")
    op.drop_index(op.f("ix_timeline_replaces"), table_name="timeline")
    op.create_index(
        op.f("ix_timeline_replaces"),
        "timeline",
        ["replaces"],
        unique=False,
        sqlite_where=_NOT_NULL,
        postgresql_where=_NOT_NULL,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_timeline_replaces"), table_name="timeline")
    op.create_index(op.f("ix_timeline_replaces"), "timeline", ["replaces"], unique=False)
    op.create_index(op.f("ix_timeline_sent_at"), "timeline", ["sent_at"], unique=False)
