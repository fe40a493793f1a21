"""contacts: contacts, contact requests, blocks, group invitations, privacy settings

Existing users keep talking: everyone an account has exchanged a 1:1 message with
(the archive's 1:1 conversations and the stored offline messages) and everyone it
shares a live group with becomes an accepted contact, from both sides, so that a
``contacts`` policy or the new group consent does not cut existing conversations.

Revision ID: 0007_contacts
Revises: 0006_logic
Create Date: 2026-12-06
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_contacts"
down_revision: str | None = "0006_logic"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = sa.String(length=64)

# Every pair of accounts that already talk, in both directions: 1:1 history (its
# "u:" conversations), stored 1:1 messages, and co-members of live groups. UNION
# drops repeats; the account checks drop "@system" and names whose account is gone.
EXISTING_PAIRS = """
INSERT INTO contacts (user_name, contact, created_at, approved_by)
SELECT pairs.a, pairs.b, :now, NULL
FROM (
    SELECT sender AS a, receiver AS b FROM history
        WHERE conversation LIKE 'u:%' AND receiver IS NOT NULL
    UNION SELECT receiver, sender FROM history
        WHERE conversation LIKE 'u:%' AND receiver IS NOT NULL
    UNION SELECT sender_uid, receiver_uid FROM offline_msgs WHERE group_id IS NULL
    UNION SELECT receiver_uid, sender_uid FROM offline_msgs WHERE group_id IS NULL
    UNION SELECT first.user_name, second.user_name
        FROM group_members first
        JOIN group_members second ON second.group_id = first.group_id
        JOIN groups ON groups.id = first.group_id
        WHERE groups.dissolved_at IS NULL
) pairs
WHERE pairs.a <> pairs.b
    AND pairs.a IN (SELECT name FROM users)
    AND pairs.b IN (SELECT name FROM users)
"""


def _user_fk(table: str, column: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], ["users.name"], name=op.f(f"fk_{table}_{column}_users"), ondelete="CASCADE"
    )


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("message_policy", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("group_adds", sa.String(length=16), nullable=True))
        batch_op.create_check_constraint(
            "message_policy", "message_policy IN ('everyone', 'contacts')"
        )
        batch_op.create_check_constraint("group_adds", "group_adds IN ('contacts', 'nobody')")

    op.create_table(
        "contacts",
        sa.Column("user_name", NAME, nullable=False),
        sa.Column("contact", NAME, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("approved_by", NAME, nullable=True),
        _user_fk("contacts", "user_name"),
        _user_fk("contacts", "contact"),
        sa.PrimaryKeyConstraint("user_name", "contact", name=op.f("pk_contacts")),
    )
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_contacts_contact"), ["contact"], unique=False)

    op.create_table(
        "contact_requests",
        sa.Column("requester", NAME, nullable=False),
        sa.Column("target", NAME, nullable=False),
        sa.Column("requested_by", NAME, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        _user_fk("contact_requests", "requester"),
        _user_fk("contact_requests", "target"),
        sa.PrimaryKeyConstraint("requester", "target", name=op.f("pk_contact_requests")),
    )
    with op.batch_alter_table("contact_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_contact_requests_target"), ["target"], unique=False)

    op.create_table(
        "blocks",
        sa.Column("user_name", NAME, nullable=False),
        sa.Column("blocked", NAME, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        _user_fk("blocks", "user_name"),
        _user_fk("blocks", "blocked"),
        sa.PrimaryKeyConstraint("user_name", "blocked", name=op.f("pk_blocks")),
    )
    with op.batch_alter_table("blocks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_blocks_blocked"), ["blocked"], unique=False)

    op.create_table(
        "group_invites",
        sa.Column("group_id", sa.String(length=26), nullable=False),
        sa.Column("user_name", NAME, nullable=False),
        sa.Column("invited_by", NAME, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name=op.f("fk_group_invites_group_id_groups"),
            ondelete="CASCADE",
        ),
        _user_fk("group_invites", "user_name"),
        _user_fk("group_invites", "invited_by"),
        sa.PrimaryKeyConstraint("group_id", "user_name", name=op.f("pk_group_invites")),
    )
    with op.batch_alter_table("group_invites", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_group_invites_user_name"), ["user_name"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_group_invites_invited_by"), ["invited_by"], unique=False
        )

    op.get_bind().execute(sa.text(EXISTING_PAIRS), {"now": time.time()})


def downgrade() -> None:
    with op.batch_alter_table("group_invites", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_group_invites_invited_by"))
        batch_op.drop_index(batch_op.f("ix_group_invites_user_name"))
    op.drop_table("group_invites")
    with op.batch_alter_table("blocks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blocks_blocked"))
    op.drop_table("blocks")
    with op.batch_alter_table("contact_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contact_requests_target"))
    op.drop_table("contact_requests")
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contacts_contact"))
    op.drop_table("contacts")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_users_group_adds"), type_="check")
        batch_op.drop_constraint(batch_op.f("ck_users_message_policy"), type_="check")
        batch_op.drop_column("group_adds")
        batch_op.drop_column("message_policy")
