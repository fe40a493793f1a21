"""Every table cim keeps, as SQLAlchemy Core ``Table`` objects on one ``MetaData``.

This module is the reference the migrations must reproduce: ``tests.unit.test_storage``
compares a freshly migrated database with ``metadata`` and fails on any difference, so
a new table needs both a ``Table`` here and a migration in ``migrations/versions``.
The shared pieces (``metadata``, ``BIG_ID``, common sizes) are in
``table_conventions``; the file service's, the logic service's and the push service's
tables in ``file_tables``, ``logic_tables`` and ``push_tables``, all gathered here.

Conventions every table follows, so SQLite and PostgreSQL behave the same:

- times are seconds since the epoch as a double (like ``SessionRecord.created_at``),
  never a ``DateTime``: SQLite would drop the time zone;
- identifiers that may outgrow 2**31 use ``BIG_ID``;
- constraints get names from ``NAMING_CONVENTION``, because Alembic can only alter or
  drop a constraint it can name, and SQLite batch migrations need the names too.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    text,
)

# The tables of one concern that no other table refers to are in modules of their
# own; every name they define is here too, so ``from cim.storage.schema import X``
# works for each table and constant, and every table is on ``metadata``.
from cim.storage.file_tables import *  # noqa: F403
from cim.storage.logic_tables import *  # noqa: F403
from cim.storage.push_tables import *  # noqa: F403
from cim.storage.table_conventions import BIG_ID as BIG_ID
from cim.storage.table_conventions import (
    DEVICE_MAX,
    GROUP_ID_LENGTH,
    USER_NAME_MAX,
    metadata,
)
from cim.storage.table_conventions import NAMING_CONVENTION as NAMING_CONVENTION
from cim.storage.table_conventions import user_column as _user_column

USER_KINDS = ("person", "device")
MESSAGE_POLICIES = ("everyone", "contacts")
GROUP_ADDS = ("contacts", "nobody")
READ_RECEIPTS = ("on", "off")

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Case-sensitive on both engines: SQLite's default BINARY collation and
    # PostgreSQL's text comparison both tell "Alice" from "alice".
    Column("name", String(USER_NAME_MAX), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("kind", String(16), nullable=False, server_default="person"),
    Column("created_at", Double, nullable=False),
    # The account's privacy settings (cim.storage.contacts); NULL follows the server's
    # default ([im] default_message_policy, default_group_adds), so an operator's
    # change of the default reaches everyone who never chose. A device ignores both:
    # it always takes messages only from its guardians and the contacts they approved.
    Column("message_policy", String(16), nullable=True),
    Column("group_adds", String(16), nullable=True),
    # Whether others see what this account read (read receipts, issue #15); NULL: on.
    Column("read_receipts", String(8), nullable=True),
    CheckConstraint("kind IN ('person', 'device')", name="kind"),
    CheckConstraint("message_policy IN ('everyone', 'contacts')", name="message_policy"),
    CheckConstraint("group_adds IN ('contacts', 'nobody')", name="group_adds"),
    CheckConstraint("read_receipts IN ('on', 'off')", name="read_receipts"),
)

GROUP_NAME_MAX = 64
GROUP_ROLES = ("owner", "admin", "member")

groups = Table(
    "groups",
    metadata,
    Column("id", String(GROUP_ID_LENGTH), primary_key=True),
    Column("name", String(GROUP_NAME_MAX), nullable=False),
    # Also the one member row with role 'owner'; both change in the same transaction.
    Column("owner", String(USER_NAME_MAX), nullable=False),
    Column("created_at", Double, nullable=False),
    # Dissolving keeps the row (member rows go): stored messages can still name the
    # group, the id is never handed out again, and a late request gets "dissolved"
    # instead of a puzzling "not found".
    Column("dissolved_at", Double, nullable=True),
    CheckConstraint("length(name) > 0", name="name_not_empty"),
)

group_members = Table(
    "group_members",
    metadata,
    Column(
        "group_id",
        String(GROUP_ID_LENGTH),
        ForeignKey("groups.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # By name, the way every other part of cim names users; deleting the account
    # removes its memberships (cim.storage.groups.leave_all_groups_txn first hands
    # ownership on, so call it before deleting a user).
    Column(
        "user_name",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("role", String(8), nullable=False),
    Column("joined_at", Double, nullable=False),
    CheckConstraint("role IN ('owner', 'admin', 'member')", name="role"),
    # "List my groups" and "resolve a group name" start from the user.
    Index(None, "user_name"),
)

group_invites = Table(
    "group_invites",
    metadata,
    # An invitation waits for the invitee's answer (cim.storage.group_invites); the
    # group's dissolution, the invitee's or the inviter's account deletion ends it.
    Column(
        "group_id",
        String(GROUP_ID_LENGTH),
        ForeignKey("groups.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "user_name",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "invited_by",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("created_at", Double, nullable=False),
    # "My invitations" starts from the invitee; a block drops the blocked one's.
    Index(None, "user_name"),
    Index(None, "invited_by"),
)

# --- contacts and blocks (cim.storage.contacts) --------------------------------------
# Rows name accounts with ON DELETE CASCADE: deleting an account ends its contacts,
# requests and blocks, from both sides.

contacts = Table(
    "contacts",
    metadata,
    # Two rows per pair, one from each side, so "is B a contact of A" is one key
    # lookup on the message path; both are written and deleted together.
    Column(
        "user_name",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "contact",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("created_at", Double, nullable=False),
    # For a device's side: the guardian who approved the contact (NULL for a person's
    # own choice, and for pairs made by the 0007 migration from past conversations).
    Column("approved_by", String(USER_NAME_MAX), nullable=True),
    Index(None, "contact"),
)

contact_requests = Table(
    "contact_requests",
    metadata,
    Column(
        "requester",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "target",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    # The requester itself, or the guardian who asked on a device's behalf.
    Column("requested_by", String(USER_NAME_MAX), nullable=False),
    Column("created_at", Double, nullable=False),
    Index(None, "target"),
)

blocks = Table(
    "blocks",
    metadata,
    Column(
        "user_name",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "blocked",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("created_at", Double, nullable=False),
    Index(None, "blocked"),
)

# --- timelines (cim.history.timeline, docs/internals.md "Timelines") -------------------
# A conversation's messages are numbered 1, 2, 3, ... (seq) in the transaction that
# writes them: ``conversations.last_seq`` is raised under its row lock, so two writers of
# one conversation serialise and a rolled back batch leaves no number used.

MSG_ID = BigInteger()
"""Server message ids (cim.message_ids) are 63-bit: too large for SQLite's autoincrement
variant, and they are never generated by the database anyway."""

CONVERSATION_MAX = 2 + 2 * 3 * USER_NAME_MAX + 1
""""d:" and two user names with every character escaped ("%3A"), or "g:" and a group id."""


conversations = Table(
    "conversations",
    metadata,
    # "d:<name>:<name>" (sorted, ':' and '%' escaped) or "g:<group id>": see
    # cim.history.store.direct_conversation.
    Column("key", String(CONVERSATION_MAX), primary_key=True),
    Column("last_seq", MSG_ID, nullable=False),
)

timeline = Table(
    "timeline",
    metadata,
    # Primary key (conversation, seq): pages by seq are a range scan of the key.
    Column("conversation", String(CONVERSATION_MAX), primary_key=True),
    Column("seq", MSG_ID, primary_key=True, autoincrement=False),
    # Unique: a message is in one timeline once; a resend with the same id finds it.
    Column("msg_id", MSG_ID, nullable=False, unique=True),
    Column("sender", String(USER_NAME_MAX), nullable=False),
    Column("sender_device", String(DEVICE_MAX), nullable=False),
    Column("client_seq", MSG_ID, nullable=False),
    # Not indexed: the retention purge goes by msg_id, whose high bits are the same
    # accept time (cim.message_ids), so a message writes one index fewer.
    Column("sent_at", Double, nullable=False),
    # The serialized cim_pb2.Message, so every reader gets exactly what was sent.
    Column("payload", LargeBinary, nullable=False),
    # len(payload): pages are bounded in bytes without reading the payloads first.
    Column("size", Integer, nullable=False),
    # A change entry (recall, edit: #15): the message it changes. A recall finds the
    # earlier edits of its message by it, to take their text out too.
    Column("replaces", MSG_ID, nullable=True),
    # A resent msg:R whose receipt the state store lost finds its message here.
    Index(None, "sender", "sender_device", "client_seq"),
    # Only change entries have ``replaces``: a partial index, which an ordinary
    # message does not write (``replaces = x`` implies it is not null, so both
    # databases use it for the recall's lookup).
    Index(
        None,
        "replaces",
        sqlite_where=text("replaces IS NOT NULL"),
        postgresql_where=text("replaces IS NOT NULL"),
    ),
)

user_conversations = Table(
    "user_conversations",
    metadata,
    Column("user_name", String(USER_NAME_MAX), primary_key=True),
    Column("conversation", String(CONVERSATION_MAX), primary_key=True),
    Column("peer", String(USER_NAME_MAX), nullable=True),
    Column("group_id", String(GROUP_ID_LENGTH), nullable=True),
    # A group member reads from its join on: the last seq when it joined.
    Column("floor_seq", MSG_ID, nullable=False),
)

cursors = Table(
    "cursors",
    metadata,
    Column("user_name", String(USER_NAME_MAX), primary_key=True),
    Column("device", String(DEVICE_MAX), primary_key=True),
    Column("conversation", String(CONVERSATION_MAX), primary_key=True),
    # The device has dealt with every message of the conversation up to here; never back.
    Column("seq", MSG_ID, nullable=False),
)

read_marks = Table(
    "read_marks",
    metadata,
    # A user's read mark in one of its conversations (cim.storage.read_marks): any of its
    # devices moves it, never back. It goes with the reader row (a member who leaves, an
    # account deleted): the foreign key cascades.
    Column("user_name", String(USER_NAME_MAX), primary_key=True),
    Column("conversation", String(CONVERSATION_MAX), primary_key=True),
    Column("seq", MSG_ID, nullable=False),
    # What others may see (read receipts): moved only while the user's setting is on, so
    # turning it off hides every later read, at once and at catch-up.
    Column("shown_seq", MSG_ID, nullable=False),
    Column("read_at", Double, nullable=False),
    ForeignKeyConstraint(
        ["user_name", "conversation"],
        ["user_conversations.user_name", "user_conversations.conversation"],
        ondelete="CASCADE",
    ),
)

LIMIT_KINDS = ("messages", "group_posts", "sos", "posts", "logic", "files")
"""The per-user limits (cim.limits) an operator can raise for one user."""

user_limits = Table(
    "user_limits",
    metadata,
    _user_column("user_name", primary_key=True),
    Column("kind", String(16), primary_key=True),
    # The user's own rate and burst in place of the configured ones ([limits]).
    Column("per_second", Double, nullable=False),
    Column("burst", Integer, nullable=False),
    Column("updated_at", Double, nullable=False),
    CheckConstraint(
        "kind IN ('messages', 'group_posts', 'sos', 'posts', 'logic', 'files')", name="kind"
    ),
    CheckConstraint("per_second >= 0 AND burst >= 1", name="rate"),
)
