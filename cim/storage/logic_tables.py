"""The logic service's tables (cim.logic): profiles, device bindings, SOS events,
fences, positions, posts and likes. Gathered by ``cim.storage.schema``."""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
)

from cim.storage.table_conventions import (
    BIG_ID,
    USER_NAME_MAX,
    metadata,
    user_column,
)

__all__ = [
    "BINDING_STATUSES",
    "DISPLAY_NAME_MAX",
    "FENCE_SHAPES",
    "FENCE_STATES",
    "POST_AUDIENCES",
    "URL_MAX",
    "binding_codes",
    "bindings",
    "fences",
    "locations",
    "post_likes",
    "posts",
    "profiles",
    "sos_events",
]

# --- the logic service (cim.logic) ----------------------------------------------------
# Every row belongs to accounts by name with ON DELETE CASCADE: deleting an account
# takes its profile, bindings, fences, positions, SOS events, posts and likes with it.

DISPLAY_NAME_MAX = 64
URL_MAX = 2048
BINDING_STATUSES = ("active", "pending")
FENCE_SHAPES = ("circle", "polygon")
FENCE_STATES = ("unknown", "inside", "outside")
POST_AUDIENCES = ("everyone", "family")


profiles = Table(
    "profiles",
    metadata,
    user_column("user_name", primary_key=True),
    Column("display_name", String(DISPLAY_NAME_MAX), nullable=False),
    Column("avatar_url", String(URL_MAX), nullable=False),
    Column("about", String(280), nullable=False),
    Column("updated_at", Double, nullable=False),
)

binding_codes = Table(
    "binding_codes",
    metadata,
    # One live code per device: asking again replaces it.
    user_column("device", primary_key=True),
    # SHA-256 of the code: a leaked table does not hand out bindings.
    Column("code_hash", String(64), nullable=False),
    Column("expires_at", Double, nullable=False),
    Column("created_at", Double, nullable=False),
)

bindings = Table(
    "bindings",
    metadata,
    user_column("device", primary_key=True),
    user_column("guardian", primary_key=True),
    # 'pending' waits for the device's first guardian to approve it.
    Column("status", String(8), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("approved_by", String(USER_NAME_MAX), nullable=True),
    Column("approved_at", Double, nullable=True),
    CheckConstraint("status IN ('active', 'pending')", name="status"),
    # "My devices" starts from the guardian.
    Index(None, "guardian"),
)

sos_events = Table(
    "sos_events",
    metadata,
    Column("id", BIG_ID, primary_key=True, autoincrement=True),
    user_column("device"),
    Column("lat", Double, nullable=False),
    Column("lon", Double, nullable=False),
    Column("accuracy_m", Double, nullable=True),
    Column("battery", Integer, nullable=True),
    Column("raised_at", Double, nullable=False),
    # Who acknowledged it first; later acknowledgements change nothing.
    Column("handled_by", String(USER_NAME_MAX), nullable=True),
    Column("handled_at", Double, nullable=True),
    Index(None, "device", "raised_at"),
)

fences = Table(
    "fences",
    metadata,
    Column("id", BIG_ID, primary_key=True, autoincrement=True),
    user_column("device"),
    Column("name", String(DISPLAY_NAME_MAX), nullable=False),
    Column("shape", String(8), nullable=False),
    # JSON: {"lat", "lon", "radius_m"} for a circle, {"points": [[lat, lon], ...]}.
    Column("geometry", Text, nullable=False),
    Column("created_by", String(USER_NAME_MAX), nullable=False),
    Column("created_at", Double, nullable=False),
    # Hysteresis: the confirmed side of the boundary, and a candidate side that
    # becomes the state after enough consecutive reports agree.
    Column("state", String(8), nullable=False, server_default="unknown"),
    Column("candidate", String(8), nullable=True),
    Column("candidate_count", Integer, nullable=False, server_default="0"),
    Column("state_changed_at", Double, nullable=True),
    CheckConstraint("shape IN ('circle', 'polygon')", name="shape"),
    CheckConstraint("state IN ('unknown', 'inside', 'outside')", name="state"),
    Index(None, "device"),
)

locations = Table(
    "locations",
    metadata,
    Column("id", BIG_ID, primary_key=True, autoincrement=True),
    user_column("device"),
    Column("lat", Double, nullable=False),
    Column("lon", Double, nullable=False),
    Column("accuracy_m", Double, nullable=True),
    # The device's own time of the fix; the retention purge goes by it.
    Column("recorded_at", Double, nullable=False, index=True),
    Column("received_at", Double, nullable=False),
    Index(None, "device", "recorded_at"),
)

posts = Table(
    "posts",
    metadata,
    Column("id", BIG_ID, primary_key=True, autoincrement=True),
    user_column("author"),
    Column("text", Text, nullable=False),
    Column("media_url", String(URL_MAX), nullable=True),
    # 'everyone': every user; 'family': the author and the accounts bound to it.
    Column("audience", String(8), nullable=False, server_default="everyone"),
    Column("like_goal", Integer, nullable=True),
    # Set once, in the transaction that stores the like reaching the goal, so the
    # author is told exactly once however many likes race.
    Column("goal_reached_at", Double, nullable=True),
    Column("created_at", Double, nullable=False),
    CheckConstraint("audience IN ('everyone', 'family')", name="audience"),
    Index(None, "author", "id"),
)

post_likes = Table(
    "post_likes",
    metadata,
    Column("post_id", BIG_ID, ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
    user_column("user_name", primary_key=True),
    Column("created_at", Double, nullable=False),
    # Set by an unlike: the row stays so that liking again is known not to be a first
    # like (the author is told of each liker once).
    Column("withdrawn_at", Double, nullable=True),
    Index(None, "user_name"),
)
