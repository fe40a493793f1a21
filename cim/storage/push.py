"""Transactions on ``push_registrations``: one per (user, device) (cim.push).

A registration is written whole (insert or replace) and removed by the device, by the
account's deletion (the foreign key cascades) or by a provider saying its token is
dead. That last removal names the token it was sent to, so a device that registered
a new token meanwhile keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from cim.storage.schema import push_registrations, users

__all__ = [
    "PushRegistration",
    "registrations_of_txn",
    "registrations_of_users_txn",
    "remove_dead_token_txn",
    "remove_registration_txn",
    "set_registration_txn",
]

_table = push_registrations


@dataclass(frozen=True)
class PushRegistration:
    user: str
    device: str
    provider: str
    token: str
    app: str | None
    locale: str | None
    created_at: float
    updated_at: float


def _row(row: Any) -> PushRegistration:
    return PushRegistration(
        str(row.user_name),
        str(row.device),
        str(row.provider),
        str(row.token),
        None if row.app is None else str(row.app),
        None if row.locale is None else str(row.locale),
        float(row.created_at),
        float(row.updated_at),
    )


def set_registration_txn(
    connection: Connection,
    user: str,
    device: str,
    provider: str,
    token: str,
    app: str | None,
    locale: str | None,
    now: float,
) -> PushRegistration | None:
    """Register or replace the device's registration; None when there is no such user."""
    if connection.execute(select(users.c.id).where(users.c.name == user)).first() is None:
        return None
    where = (_table.c.user_name == user, _table.c.device == device)
    values = {"provider": provider, "token": token, "app": app, "locale": locale}
    changed = connection.execute(update(_table).where(*where).values(updated_at=now, **values))
    if not changed.rowcount:
        connection.execute(
            insert(_table).values(
                user_name=user, device=device, created_at=now, updated_at=now, **values
            )
        )
    row = connection.execute(select(_table).where(*where)).one()
    return _row(row)


def remove_registration_txn(connection: Connection, user: str, device: str) -> bool:
    """Remove the device's registration; False when it had none."""
    result = connection.execute(
        delete(_table).where(_table.c.user_name == user, _table.c.device == device)
    )
    return bool(result.rowcount)


def remove_dead_token_txn(connection: Connection, user: str, device: str, token: str) -> bool:
    """A provider said ``token`` is dead: remove the registration if it still holds it."""
    result = connection.execute(
        delete(_table).where(
            _table.c.user_name == user, _table.c.device == device, _table.c.token == token
        )
    )
    return bool(result.rowcount)


def registrations_of_txn(connection: Connection, user: str) -> list[PushRegistration]:
    """The user's registrations, by device."""
    rows = connection.execute(
        select(_table).where(_table.c.user_name == user).order_by(_table.c.device)
    ).all()
    return [_row(row) for row in rows]


def registrations_of_users_txn(
    connection: Connection, names: Sequence[str]
) -> list[PushRegistration]:
    """The registrations of every user named (a group's members at once)."""
    if not names:
        return []
    rows = connection.execute(
        select(_table)
        .where(_table.c.user_name.in_(sorted(set(names))))
        .order_by(_table.c.user_name, _table.c.device)
    ).all()
    return [_row(row) for row in rows]
