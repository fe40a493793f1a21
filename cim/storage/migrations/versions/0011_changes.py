"""changes: recall and edit entries in the timelines (issue #15)

A recall or an edit is an entry of its own in the conversation's timeline; its
``replaces`` column names the message it changes, so a recall finds that message's
earlier edits (and takes their text out too) through one index. Messages have none.

Revision ID: 0011_changes
Revises: 0010_timelines
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_changes"
down_revision: str | None = "0010_timelines"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("timeline", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replaces", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_timeline_replaces"), ["replaces"], unique=False)


def downgrade() -> None:
    """Back to 0010: the entries stay as rows of their conversations (a release without
    recall shows them as messages); what a recall removed stays removed."""
    with op.batch_alter_table("timeline", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_timeline_replaces"))
        batch_op.drop_column("replaces")
