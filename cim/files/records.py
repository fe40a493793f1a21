"""Transactions on the file tables, run by ``Database.run`` on the database pool.

Quotas are decided inside the same transaction that reserves the space (creating an
upload, or holding an existing file), so two requests of one user racing each other
cannot both slip under the limit. Who may read a file, sharing, deleting and the
purge are in ``cim.storage.files_access``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from cim.storage.files_access import may_read
from cim.storage.schema import file_refs, files, upload_chunks, uploads, users


class QuotaExceeded(Exception):
    def __init__(self, used: int, wanted: int, quota: int) -> None:
        super().__init__(used, wanted, quota)
        self.used = used
        self.wanted = wanted
        self.quota = quota


class TooManyUploads(Exception):
    """The user has as many unfinished uploads as allowed."""


class NoSuchAccount(Exception):
    """The caller's session outlived its account (deleted with ``cimctl user del``)."""


@dataclass(frozen=True)
class FileRecord:
    id: str
    sha256: str
    md5: str
    size: int
    mime: str
    name: str
    width: int | None
    height: int | None
    thumbnail: str | None
    created_by: str
    created_at: float


@dataclass(frozen=True)
class UploadRecord:
    id: str
    user: str
    name: str
    size: int
    md5: str
    mime: str
    chunk_size: int
    chunk_count: int
    created_at: float
    expires_at: float

    def chunk_length(self, chunk: int) -> int:
        """How many bytes chunk number ``chunk`` must have: all full but the last."""
        if chunk < self.chunk_count - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunk_count - 1)


def _file(row: Any) -> FileRecord:
    return FileRecord(
        row.id,
        row.sha256,
        row.md5,
        int(row.size),
        row.mime,
        row.name,
        row.width,
        row.height,
        row.thumbnail,
        row.created_by,
        row.created_at,
    )


def _upload(row: Any) -> UploadRecord:
    return UploadRecord(
        row.id,
        row.user_name,
        row.name,
        int(row.size),
        row.md5,
        row.mime,
        row.chunk_size,
        row.chunk_count,
        row.created_at,
        row.expires_at,
    )


def file_txn(connection: Connection, file_id: str) -> FileRecord | None:
    row = connection.execute(select(files).where(files.c.id == file_id)).first()
    return None if row is None else _file(row)


def readable_file_txn(connection: Connection, file_id: str, user: str) -> FileRecord | None:
    """The file, when ``user`` may read it; None when not, as when there is no such file."""
    row = connection.execute(
        select(files).where(files.c.id == file_id, may_read(files.c.id, user))
    ).first()
    return None if row is None else _file(row)


def files_by_content_txn(connection: Connection, md5: str, size: int) -> list[FileRecord]:
    """Stored files with this MD5 and size: one, or more when someone made MD5s collide."""
    rows = connection.execute(
        select(files)
        .where(files.c.md5 == md5, files.c.size == size)
        .order_by(files.c.created_at)
        .limit(8)
    ).all()
    return [_file(row) for row in rows]


def held_content_txn(connection: Connection, user: str, md5: str, size: int) -> FileRecord | None:
    """A file with this content that ``user`` holds (and has not deleted)."""
    row = connection.execute(
        select(files)
        .select_from(files.join(file_refs, file_refs.c.file_id == files.c.id))
        .where(
            files.c.md5 == md5,
            files.c.size == size,
            file_refs.c.user_name == user,
            file_refs.c.deleted_at.is_(None),
        )
    ).first()
    return None if row is None else _file(row)


def file_by_sha256_txn(connection: Connection, sha256: str) -> FileRecord | None:
    row = connection.execute(select(files).where(files.c.sha256 == sha256)).first()
    return None if row is None else _file(row)


def used_bytes_txn(connection: Connection, user: str) -> int:
    """Bytes counted against a user: files they hold plus their unfinished uploads."""
    held = connection.execute(
        select(func.coalesce(func.sum(files.c.size), 0))
        .select_from(file_refs.join(files, file_refs.c.file_id == files.c.id))
        .where(file_refs.c.user_name == user)
    ).scalar_one()
    pending = connection.execute(
        select(func.coalesce(func.sum(uploads.c.size), 0)).where(uploads.c.user_name == user)
    ).scalar_one()
    return int(held) + int(pending)


def _holding_txn(connection: Connection, file_id: str, user: str) -> bool:
    """Whether ``user`` has a holding of the file, deleted or not (both count for quota)."""
    row = connection.execute(
        select(file_refs.c.file_id).where(
            file_refs.c.file_id == file_id, file_refs.c.user_name == user
        )
    ).first()
    return row is not None


def _check_account_txn(connection: Connection, user: str) -> None:
    if connection.execute(select(users.c.id).where(users.c.name == user)).first() is None:
        raise NoSuchAccount(user)


def _add_ref_txn(connection: Connection, file_id: str, user: str, now: float) -> None:
    """Make ``user`` a holder; a holding deleted during the grace period comes back."""
    if _holding_txn(connection, file_id, user):
        connection.execute(
            update(file_refs)
            .where(file_refs.c.file_id == file_id, file_refs.c.user_name == user)
            .values(deleted_at=None)
        )
        return
    try:
        with connection.begin_nested():
            connection.execute(
                insert(file_refs).values(file_id=file_id, user_name=user, created_at=now)
            )
    except IntegrityError:
        if not _holding_txn(connection, file_id, user):
            raise


def hold_txn(
    connection: Connection, file_id: str, user: str, quota: int, now: float
) -> FileRecord | None:
    """Instant upload, once possession is proven: ``user`` holds the file too.

    None when the file is gone (purged meanwhile): the client uploads it instead.
    """
    _check_account_txn(connection, user)
    record = file_txn(connection, file_id)
    if record is None:
        return None
    if quota and not _holding_txn(connection, file_id, user):
        used = used_bytes_txn(connection, user)
        if used + record.size > quota:
            raise QuotaExceeded(used, record.size, quota)
    try:
        _add_ref_txn(connection, file_id, user, now)
    except IntegrityError:
        return None  # purged between the read and the insert
    return record


def create_upload_txn(
    connection: Connection, upload: UploadRecord, quota: int, max_pending: int
) -> None:
    pending = connection.execute(
        select(func.count()).select_from(uploads).where(uploads.c.user_name == upload.user)
    ).scalar_one()
    _check_account_txn(connection, upload.user)
    if pending >= max_pending:
        raise TooManyUploads()
    if quota:
        used = used_bytes_txn(connection, upload.user)
        if used + upload.size > quota:
            raise QuotaExceeded(used, upload.size, quota)
    connection.execute(
        insert(uploads).values(
            id=upload.id,
            user_name=upload.user,
            name=upload.name,
            size=upload.size,
            md5=upload.md5,
            mime=upload.mime,
            chunk_size=upload.chunk_size,
            chunk_count=upload.chunk_count,
            created_at=upload.created_at,
            expires_at=upload.expires_at,
        )
    )


def upload_txn(connection: Connection, upload_id: str, now: float) -> UploadRecord | None:
    """The upload unless it is unknown or past its expiry (the sweeper may be behind)."""
    row = connection.execute(
        select(uploads).where(uploads.c.id == upload_id, uploads.c.expires_at >= now)
    ).first()
    return None if row is None else _upload(row)


def received_chunks_txn(connection: Connection, upload_id: str) -> list[int]:
    rows = connection.execute(
        select(upload_chunks.c.chunk)
        .where(upload_chunks.c.upload_id == upload_id)
        .order_by(upload_chunks.c.chunk)
    ).all()
    return [row.chunk for row in rows]


def record_chunk_txn(
    connection: Connection, upload_id: str, chunk: int, size: int, now: float, expires_at: float
) -> int | None:
    """Note a stored chunk and push the expiry on; the chunks received so far.

    None when the upload is gone (expired, completed or aborted meanwhile).
    """
    moved = connection.execute(
        update(uploads).where(uploads.c.id == upload_id).values(expires_at=expires_at)
    )
    if moved.rowcount == 0:
        return None
    try:
        # A chunk sent twice (a retry whose first answer was lost) is recorded once.
        with connection.begin_nested():
            connection.execute(
                insert(upload_chunks).values(
                    upload_id=upload_id, chunk=chunk, size=size, received_at=now
                )
            )
    except IntegrityError:
        connection.execute(
            update(upload_chunks)
            .where(upload_chunks.c.upload_id == upload_id, upload_chunks.c.chunk == chunk)
            .values(size=size, received_at=now)
        )
    count = connection.execute(
        select(func.count())
        .select_from(upload_chunks)
        .where(upload_chunks.c.upload_id == upload_id)
    ).scalar_one()
    return int(count)


def finish_upload_txn(
    connection: Connection, upload_id: str, record: FileRecord, user: str, now: float
) -> FileRecord:
    """Turn a verified upload into a file held by its uploader, ``user``.

    When the content is stored already (found by SHA-256), that file is returned
    and ``record`` is dropped: one content, one file id; ``user`` holds it too.
    """
    existing = file_by_sha256_txn(connection, record.sha256)
    if existing is not None:
        stored = existing
    else:
        try:
            with connection.begin_nested():
                connection.execute(
                    insert(files).values(
                        id=record.id,
                        sha256=record.sha256,
                        md5=record.md5,
                        size=record.size,
                        mime=record.mime,
                        name=record.name,
                        width=record.width,
                        height=record.height,
                        thumbnail=record.thumbnail,
                        created_by=record.created_by,
                        created_at=record.created_at,
                    )
                )
            stored = record
        except IntegrityError:
            # Another node finished the same content a moment ago.
            found = file_by_sha256_txn(connection, record.sha256)
            if found is None:
                raise
            stored = found
    _add_ref_txn(connection, stored.id, user, now)
    connection.execute(delete(uploads).where(uploads.c.id == upload_id))
    return stored


def delete_upload_txn(connection: Connection, upload_id: str) -> bool:
    result = connection.execute(delete(uploads).where(uploads.c.id == upload_id))
    return result.rowcount > 0


def expire_uploads_txn(connection: Connection, now: float, limit: int) -> list[str]:
    """Delete up to ``limit`` uploads past their expiry; their ids, to remove the chunks."""
    rows = connection.execute(
        select(uploads.c.id).where(uploads.c.expires_at < now).limit(limit)
    ).all()
    ids = [row.id for row in rows]
    if ids:
        connection.execute(delete(uploads).where(uploads.c.id.in_(ids)))
    return ids


def known_uploads_txn(connection: Connection, upload_ids: list[str]) -> set[str]:
    if not upload_ids:
        return set()
    rows = connection.execute(select(uploads.c.id).where(uploads.c.id.in_(upload_ids))).all()
    return {row.id for row in rows}
