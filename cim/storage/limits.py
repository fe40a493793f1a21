"""Transactions on ``user_limits``: the rates an operator raised (or lowered) for one
user with ``cimctl limits``, which every node reads in place of ``[limits]``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from cim.storage.schema import LIMIT_KINDS, user_limits, users

__all__ = [
    "UserLimitRow",
    "all_user_limits_txn",
    "reset_user_limits_txn",
    "set_user_limits_txn",
    "user_limits_txn",
]


@dataclass(frozen=True)
class UserLimitRow:
    user: str
    kind: str
    per_second: float
    burst: int
    updated_at: float


def _row(row: object) -> UserLimitRow:
    return UserLimitRow(
        row.user_name,  # type: ignore[attr-defined]
        row.kind,  # type: ignore[attr-defined]
        float(row.per_second),  # type: ignore[attr-defined]
        int(row.burst),  # type: ignore[attr-defined]
        float(row.updated_at),  # type: ignore[attr-defined]
    )


def set_user_limits_txn(
    connection: Connection, user: str, rates: dict[str, tuple[float, int]], now: float
) -> bool:
    """Set ``kind -> (per_second, burst)`` for user; False when there is no such user."""
    if connection.execute(select(users.c.id).where(users.c.name == user)).first() is None:
        return False
    for kind, (per_second, burst) in sorted(rates.items()):
        if kind not in LIMIT_KINDS:
            raise ValueError(f"no per-user limit {kind!r}")
        connection.execute(
            delete(user_limits).where(user_limits.c.user_name == user, user_limits.c.kind == kind)
        )
        connection.execute(
            insert(user_limits).values(
                user_name=user, kind=kind, per_second=per_second, burst=burst, updated_at=now
            )
        )
    return True


def reset_user_limits_txn(
    connection: Connection, user: str, kinds: Sequence[str] | None = None
) -> int:
    """Back to the configured limits (all of them, or ``kinds``); how many rows went."""
    statement = delete(user_limits).where(user_limits.c.user_name == user)
    if kinds is not None:
        statement = statement.where(user_limits.c.kind.in_(list(kinds)))
    return int(connection.execute(statement).rowcount)


def user_limits_txn(connection: Connection, user: str) -> list[UserLimitRow] | None:
    """The user's own limits, by kind; None when there is no such user."""
    if connection.execute(select(users.c.id).where(users.c.name == user)).first() is None:
        return None
    rows = connection.execute(
        select(user_limits).where(user_limits.c.user_name == user).order_by(user_limits.c.kind)
    ).all()
    return [_row(row) for row in rows]


def all_user_limits_txn(connection: Connection) -> list[UserLimitRow]:
    """Every raised limit: few (an operator sets them one by one), read whole by nodes."""
    rows = connection.execute(
        select(user_limits).order_by(user_limits.c.user_name, user_limits.c.kind)
    ).all()
    return [_row(row) for row in rows]
