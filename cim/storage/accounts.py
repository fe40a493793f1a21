"""Transactions on the ``users`` table, run by ``Database.run`` or inline by cimctl.

Each function takes an open ``Connection`` already inside a transaction and returns
plain data, so the same code serves the daemon's thread pool and the blocking CLI.
They do not validate names or passwords: ``cim.accounts`` does, before any KDF runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from cim.storage.schema import users


@dataclass(frozen=True)
class UserRecord:
    """A user as the rest of cim sees it; the password hash deliberately stays out."""

    id: int
    name: str
    kind: str
    created_at: float


def insert_user_txn(
    connection: Connection, name: str, password_hash: str, kind: str, created_at: float
) -> int | None:
    """The new user's id, or None when the name is taken.

    The insert runs in a savepoint, so losing a race against another insert of the
    same name leaves the outer transaction usable (PostgreSQL aborts it otherwise).
    """
    try:
        with connection.begin_nested():
            result = connection.execute(
                insert(users).values(
                    name=name, password_hash=password_hash, kind=kind, created_at=created_at
                )
            )
    except IntegrityError:
        if user_exists_txn(connection, name):
            return None
        raise
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def password_hash_txn(connection: Connection, name: str) -> str | None:
    """The stored hash for name, for the KDF pool to check; None for no such user.

    Plain SQL in the driver's placeholders: it runs at every login, and building the
    expression tree cost more than the query."""
    mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    row = connection.exec_driver_sql(
        f"SELECT password_hash FROM users WHERE name = {mark}", (name,)
    ).first()
    return None if row is None else str(row[0])


def user_txn(connection: Connection, name: str) -> UserRecord | None:
    row = connection.execute(
        select(users.c.id, users.c.name, users.c.kind, users.c.created_at).where(
            users.c.name == name
        )
    ).first()
    if row is None:
        return None
    return UserRecord(row.id, row.name, row.kind, row.created_at)


def user_exists_txn(connection: Connection, name: str) -> bool:
    count = connection.execute(
        select(func.count()).select_from(users).where(users.c.name == name)
    ).scalar_one()
    return bool(count)


def set_password_hash_txn(connection: Connection, name: str, password_hash: str) -> bool:
    """False when there is no such user."""
    result = connection.execute(
        update(users).where(users.c.name == name).values(password_hash=password_hash)
    )
    return result.rowcount > 0


def delete_user_txn(connection: Connection, name: str) -> bool:
    """False when there was no such user."""
    result = connection.execute(delete(users).where(users.c.name == name))
    return result.rowcount > 0


def list_users_txn(connection: Connection) -> list[UserRecord]:
    """Every user, ordered by name in the database's collation."""
    rows = connection.execute(
        select(users.c.id, users.c.name, users.c.kind, users.c.created_at).order_by(users.c.name)
    ).all()
    return [UserRecord(row.id, row.name, row.kind, row.created_at) for row in rows]
