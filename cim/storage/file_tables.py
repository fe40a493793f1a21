"""The file service's tables (cim.files): files, who holds them, who they are
shared with, and uploads in progress. Gathered by ``cim.storage.schema``."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
)

from cim.storage.table_conventions import (
    GROUP_ID_LENGTH,
    USER_NAME_MAX,
    metadata,
)

__all__ = [
    "FILE_ID_LENGTH",
    "FILE_NAME_MAX",
    "MIME_MAX",
    "file_group_shares",
    "file_refs",
    "file_shares",
    "files",
    "upload_chunks",
    "uploads",
]

# --- the file service (cim.files) ---------------------------------------------------

FILE_ID_LENGTH = 22
"""16 random bytes, URL-safe base64 without padding: unguessable file and upload ids."""
FILE_NAME_MAX = 255
MIME_MAX = 127

files = Table(
    "files",
    metadata,
    Column("id", String(FILE_ID_LENGTH), primary_key=True),
    # The content address: the blob's path is derived from it, never from a name.
    Column("sha256", String(64), nullable=False, unique=True),
    # What instant upload (闪电上传) looks files up by, together with the size.
    Column("md5", String(32), nullable=False, index=True),
    Column("size", BigInteger, nullable=False),
    Column("mime", String(MIME_MAX), nullable=False),
    # For display and Content-Disposition only; already stripped of any path.
    Column("name", String(FILE_NAME_MAX), nullable=False),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    # The thumbnail's format ("jpeg" or "png"), NULL when the file is no image.
    Column("thumbnail", String(16), nullable=True),
    Column("created_by", String(USER_NAME_MAX), nullable=False),
    Column("created_at", Double, nullable=False),
)

file_refs = Table(
    "file_refs",
    metadata,
    # Who holds which file (its uploaders, by upload or proven instant upload): they
    # read it, may delete it, and it counts toward their quota. Deleting the account
    # deletes its holdings; copies sent in conversations are in file_shares.
    Column(
        "file_id",
        String(FILE_ID_LENGTH),
        ForeignKey("files.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "user_name",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("created_at", Double, nullable=False),
    # Set by DELETE /api/v1/files/{id}: the holder no longer reads it, but it counts
    # toward the quota until the purge removes the row after [files] purge_grace.
    Column("deleted_at", Double, nullable=True),
    Index(None, "user_name"),
)

file_shares = Table(
    "file_shares",
    metadata,
    # A file sent in a one-to-one conversation: one row per participant, so each
    # reads it for as long as their own account lives. Written by the IM node when
    # it takes the message (cim.im.shares), only if the sender may read the file.
    Column(
        "file_id",
        String(FILE_ID_LENGTH),
        ForeignKey("files.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "user_name",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    # The other participant: the conversation is (user_name, peer).
    Column("peer", String(USER_NAME_MAX), primary_key=True),
    Column("shared_at", Double, nullable=False),
    # "Which files may this user read" starts from the user.
    Index(None, "user_name"),
)

file_group_shares = Table(
    "file_group_shares",
    metadata,
    # A file sent to a group: read by its members of the moment.
    Column(
        "file_id",
        String(FILE_ID_LENGTH),
        ForeignKey("files.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "group_id",
        String(GROUP_ID_LENGTH),
        ForeignKey("groups.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("shared_by", String(USER_NAME_MAX), nullable=False),
    Column("shared_at", Double, nullable=False),
)

uploads = Table(
    "uploads",
    metadata,
    Column("id", String(FILE_ID_LENGTH), primary_key=True),
    Column(
        "user_name",
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("name", String(FILE_NAME_MAX), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("md5", String(32), nullable=False),
    Column("mime", String(MIME_MAX), nullable=False),
    Column("chunk_size", Integer, nullable=False),
    Column("chunk_count", Integer, nullable=False),
    Column("created_at", Double, nullable=False),
    # Moved forward by every stored chunk; the sweeper deletes what is past it.
    Column("expires_at", Double, nullable=False, index=True),
)

upload_chunks = Table(
    "upload_chunks",
    metadata,
    Column(
        "upload_id",
        String(FILE_ID_LENGTH),
        ForeignKey("uploads.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("chunk", Integer, primary_key=True),
    Column("size", Integer, nullable=False),
    Column("received_at", Double, nullable=False),
)
