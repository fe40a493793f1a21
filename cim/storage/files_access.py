"""Who may read a stored file, the conversations it was sent in, and what the purge takes.

A file is read by its holders (``file_refs`` rows not deleted: whoever uploaded the
content, or proved they have it for an instant upload) and by the participants of
the conversations it was sent in: both people of a one-to-one conversation
(``file_shares``, one row each) and the current members of a group
(``file_group_shares`` joined with ``group_members``). The IM node records a share
when it takes a message naming the file, and only when the sender may read it.

A file nobody holds, nobody was sent and no group member reads any more is
unreferenced: the purge deletes its row, then its blob. Deleted holdings keep
counting (toward their holder's quota, and as a reference) until the purge removes
them after ``[files] purge_grace``.

Every function here is a ``*_txn`` for ``Database.run``: blocking, plain data back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, not_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from cim.storage.schema import (
    file_group_shares,
    file_refs,
    file_shares,
    files,
    group_members,
    groups,
    uploads,
    users,
)

__all__ = [
    "PurgedFile",
    "Released",
    "contents_in_use_txn",
    "forget_released_txn",
    "may_read",
    "may_read_txn",
    "purge_unreferenced_txn",
    "release_txn",
    "share_txn",
]


# --- reading --------------------------------------------------------------------------


def may_read(file_id: Any, user: str) -> ColumnElement[bool]:
    """The condition "``user`` may read the file ``file_id``" (a value or a column)."""
    held = exists().where(
        file_refs.c.file_id == file_id,
        file_refs.c.user_name == user,
        file_refs.c.deleted_at.is_(None),
    )
    sent = exists().where(file_shares.c.file_id == file_id, file_shares.c.user_name == user)
    in_group = exists().where(
        file_group_shares.c.file_id == file_id,
        group_members.c.group_id == file_group_shares.c.group_id,
        group_members.c.user_name == user,
    )
    return or_(held, sent, in_group)


def may_read_txn(connection: Connection, file_id: str, user: str) -> bool:
    row = connection.execute(
        select(files.c.id).where(files.c.id == file_id, may_read(files.c.id, user))
    ).first()
    return row is not None


# --- sharing: the IM node, when it takes a message naming files ------------------------


def _insert_ignoring_duplicates(
    connection: Connection, table: Any, rows: list[dict[str, Any]]
) -> None:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(dialect.insert(table).on_conflict_do_nothing(), rows)


def share_txn(
    connection: Connection,
    file_ids: Sequence[str],
    sender: str,
    to: str,
    group: str,
    now: float,
) -> bool:
    """Record that ``sender`` sent these files to ``to`` (or to ``group``).

    False, and nothing recorded, when the sender may not read one of them (a file
    that does not exist included: the answer is the same, so ids cannot be probed).
    Participants without an account, or a group that is gone, get nothing.
    """
    for file_id in file_ids:
        if not may_read_txn(connection, file_id, sender):
            return False
    if group:
        live = connection.execute(
            select(groups.c.id).where(groups.c.id == group, groups.c.dissolved_at.is_(None))
        ).first()
        if live is None:
            return True
        rows = [
            {"file_id": f, "group_id": group, "shared_by": sender, "shared_at": now}
            for f in file_ids
        ]
        _insert_ignoring_duplicates(connection, file_group_shares, rows)
        return True
    existing = set(
        connection.execute(select(users.c.name).where(users.c.name.in_({sender, to}))).scalars()
    )
    pairs = {(sender, to), (to, sender)}
    rows = [
        {"file_id": f, "user_name": user, "peer": peer, "shared_at": now}
        for f in file_ids
        for user, peer in sorted(pairs)
        if user in existing
    ]
    if rows:
        try:
            # An account deleted this very moment: its rows would break the key.
            with connection.begin_nested():
                _insert_ignoring_duplicates(connection, file_shares, rows)
        except IntegrityError:
            return True
    return True


# --- deleting: DELETE /api/v1/files/{id} ------------------------------------------------


@dataclass(frozen=True)
class Released:
    held: bool
    """The caller held the file: its quota is freed when the purge removes the holding."""
    readable: bool
    """The caller still reads it (it was sent to a group the caller is in)."""
    shared: bool
    """Somebody else still reads it: the blob stays for them."""


def _others_read(connection: Connection, file_id: str, user: str) -> bool:
    held = exists().where(
        file_refs.c.file_id == file_id,
        file_refs.c.user_name != user,
        file_refs.c.deleted_at.is_(None),
    )
    sent = exists().where(file_shares.c.file_id == file_id, file_shares.c.user_name != user)
    in_group = exists().where(
        file_group_shares.c.file_id == file_id,
        group_members.c.group_id == file_group_shares.c.group_id,
        group_members.c.user_name != user,
    )
    return connection.execute(select(or_(held, sent, in_group))).scalar_one() is True


def release_txn(connection: Connection, file_id: str, user: str, now: float) -> Released | None:
    """The caller's holding and one-to-one copies of the file go; None: they had none.

    "Delete for me": the other participants of the conversations it was sent in keep
    their copies, and a group's copy stays with the group.
    """
    held = connection.execute(
        update(file_refs)
        .where(
            file_refs.c.file_id == file_id,
            file_refs.c.user_name == user,
            file_refs.c.deleted_at.is_(None),
        )
        .values(deleted_at=now)
    ).rowcount
    copies = connection.execute(
        delete(file_shares).where(file_shares.c.file_id == file_id, file_shares.c.user_name == user)
    ).rowcount
    if not held and not copies:
        return None
    return Released(
        held=held > 0,
        readable=may_read_txn(connection, file_id, user),
        shared=_others_read(connection, file_id, user),
    )


# --- the purge ------------------------------------------------------------------------


@dataclass(frozen=True)
class PurgedFile:
    id: str
    sha256: str
    md5: str
    size: int
    thumbnail: str | None


def forget_released_txn(connection: Connection, before: float, limit: int) -> int:
    """Remove up to ``limit`` holdings deleted before ``before``: their quota is free."""
    rows = connection.execute(
        select(file_refs.c.file_id, file_refs.c.user_name)
        .where(file_refs.c.deleted_at < before)
        .limit(limit)
    ).all()
    for row in rows:
        connection.execute(
            delete(file_refs).where(
                file_refs.c.file_id == row.file_id,
                file_refs.c.user_name == row.user_name,
                file_refs.c.deleted_at < before,
            )
        )
    return len(rows)


def _unreferenced() -> ColumnElement[bool]:
    """No holding (deleted ones included), no copy, no group member, no upload of it."""
    held = exists().where(file_refs.c.file_id == files.c.id)
    sent = exists().where(file_shares.c.file_id == files.c.id)
    in_group = exists().where(
        file_group_shares.c.file_id == files.c.id,
        group_members.c.group_id == file_group_shares.c.group_id,
    )
    # Someone is uploading the same content: completing it will want this file.
    arriving = exists().where(uploads.c.md5 == files.c.md5, uploads.c.size == files.c.size)
    return not_(or_(held, sent, in_group, arriving))


def purge_unreferenced_txn(connection: Connection, limit: int) -> list[PurgedFile]:
    """Delete up to ``limit`` unreferenced file rows; what they were, to remove the bytes.

    The rows are locked first (on PostgreSQL; SQLite has one writer anyway), and the
    condition is checked again by the delete, a statement with a fresh snapshot: a
    holding or share added meanwhile either committed before (and spares the file)
    or waits for this transaction and then fails its foreign key, as for any file
    that is gone.
    """
    candidates = connection.execute(
        select(files.c.id, files.c.sha256, files.c.md5, files.c.size, files.c.thumbnail)
        .where(_unreferenced())
        .limit(limit)
        .with_for_update(of=files, skip_locked=True)
    ).all()
    if not candidates:
        return []
    ids = [row.id for row in candidates]
    connection.execute(delete(files).where(files.c.id.in_(ids), _unreferenced()))
    remaining = set(connection.execute(select(files.c.id).where(files.c.id.in_(ids))).scalars())
    return [
        PurgedFile(row.id, row.sha256, row.md5, int(row.size), row.thumbnail)
        for row in candidates
        if row.id not in remaining
    ]


def contents_in_use_txn(connection: Connection, purged: Sequence[PurgedFile]) -> set[str]:
    """The SHA-256s of purged files whose content is wanted again after all.

    Between deleting a row and removing its blob, the same content may have been
    stored again (a new file with the same address) or be arriving in an upload.
    """
    if not purged:
        return set()
    shas = [item.sha256 for item in purged]
    stored = set(
        connection.execute(select(files.c.sha256).where(files.c.sha256.in_(shas))).scalars()
    )
    conditions = [and_(uploads.c.md5 == item.md5, uploads.c.size == item.size) for item in purged]
    arriving = connection.execute(
        select(uploads.c.md5, uploads.c.size).where(or_(*conditions))
    ).all()
    wanted = {(row.md5, int(row.size)) for row in arriving}
    stored.update(item.sha256 for item in purged if (item.md5, item.size) in wanted)
    return stored
