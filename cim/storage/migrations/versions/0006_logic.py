"""logic: profiles, device bindings, SOS, geofences, locations, posts and likes

Revision ID: 0006_logic
Revises: 0005_offline
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_logic"
down_revision: str | None = "0005_offline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "binding_codes",
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device"],
            ["users.name"],
            name=op.f("fk_binding_codes_device_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device", name=op.f("pk_binding_codes")),
    )
    op.create_table(
        "bindings",
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("guardian", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("approved_by", sa.String(length=64), nullable=True),
        sa.Column("approved_at", sa.Double(), nullable=True),
        sa.CheckConstraint("status IN ('active', 'pending')", name=op.f("ck_bindings_status")),
        sa.ForeignKeyConstraint(
            ["device"], ["users.name"], name=op.f("fk_bindings_device_users"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["guardian"],
            ["users.name"],
            name=op.f("fk_bindings_guardian_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device", "guardian", name=op.f("pk_bindings")),
    )
    with op.batch_alter_table("bindings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bindings_guardian"), ["guardian"], unique=False)

    op.create_table(
        "fences",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("shape", sa.String(length=8), nullable=False),
        sa.Column("geometry", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("state", sa.String(length=8), server_default="unknown", nullable=False),
        sa.Column("candidate", sa.String(length=8), nullable=True),
        sa.Column("candidate_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("state_changed_at", sa.Double(), nullable=True),
        sa.CheckConstraint("shape IN ('circle', 'polygon')", name=op.f("ck_fences_shape")),
        sa.CheckConstraint(
            "state IN ('unknown', 'inside', 'outside')", name=op.f("ck_fences_state")
        ),
        sa.ForeignKeyConstraint(
            ["device"], ["users.name"], name=op.f("fk_fences_device_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fences")),
    )
    with op.batch_alter_table("fences", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fences_device"), ["device"], unique=False)

    op.create_table(
        "locations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("lat", sa.Double(), nullable=False),
        sa.Column("lon", sa.Double(), nullable=False),
        sa.Column("accuracy_m", sa.Double(), nullable=True),
        sa.Column("recorded_at", sa.Double(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device"], ["users.name"], name=op.f("fk_locations_device_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_locations")),
    )
    with op.batch_alter_table("locations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_locations_device"), ["device", "recorded_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_locations_recorded_at"), ["recorded_at"], unique=False)

    op.create_table(
        "posts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("author", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("media_url", sa.String(length=2048), nullable=True),
        sa.Column("audience", sa.String(length=8), server_default="everyone", nullable=False),
        sa.Column("like_goal", sa.Integer(), nullable=True),
        sa.Column("goal_reached_at", sa.Double(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.CheckConstraint("audience IN ('everyone', 'family')", name=op.f("ck_posts_audience")),
        sa.ForeignKeyConstraint(
            ["author"], ["users.name"], name=op.f("fk_posts_author_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_posts")),
    )
    with op.batch_alter_table("posts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_posts_author"), ["author", "id"], unique=False)

    op.create_table(
        "profiles",
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=64), nullable=False),
        sa.Column("avatar_url", sa.String(length=2048), nullable=False),
        sa.Column("about", sa.String(length=280), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_name"],
            ["users.name"],
            name=op.f("fk_profiles_user_name_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_name", name=op.f("pk_profiles")),
    )
    op.create_table(
        "sos_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("lat", sa.Double(), nullable=False),
        sa.Column("lon", sa.Double(), nullable=False),
        sa.Column("accuracy_m", sa.Double(), nullable=True),
        sa.Column("battery", sa.Integer(), nullable=True),
        sa.Column("raised_at", sa.Double(), nullable=False),
        sa.Column("handled_by", sa.String(length=64), nullable=True),
        sa.Column("handled_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device"], ["users.name"], name=op.f("fk_sos_events_device_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sos_events")),
    )
    with op.batch_alter_table("sos_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_sos_events_device"), ["device", "raised_at"], unique=False
        )

    op.create_table(
        "post_likes",
        sa.Column("post_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("withdrawn_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["post_id"], ["posts.id"], name=op.f("fk_post_likes_post_id_posts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_name"],
            ["users.name"],
            name=op.f("fk_post_likes_user_name_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("post_id", "user_name", name=op.f("pk_post_likes")),
    )
    with op.batch_alter_table("post_likes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_post_likes_user_name"), ["user_name"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("post_likes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_post_likes_user_name"))

    op.drop_table("post_likes")
    with op.batch_alter_table("sos_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sos_events_device"))

    op.drop_table("sos_events")
    op.drop_table("profiles")
    with op.batch_alter_table("posts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_posts_author"))

    op.drop_table("posts")
    with op.batch_alter_table("locations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_locations_recorded_at"))
        batch_op.drop_index(batch_op.f("ix_locations_device"))

    op.drop_table("locations")
    with op.batch_alter_table("fences", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fences_device"))

    op.drop_table("fences")
    with op.batch_alter_table("bindings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bindings_guardian"))

    op.drop_table("bindings")
    op.drop_table("binding_codes")
