"""Transactions on profiles and on deleting an account with everything it owns."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from cim.storage.bindings import bound_accounts_txn
from cim.storage.groups import leave_all_groups_txn
from cim.storage.schema import bindings, offline_msgs, profiles, users


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str
    display_name: str
    avatar_url: str
    about: str
    created_at: float


def profile_txn(connection: Connection, name: str) -> Profile | None:
    row = connection.execute(
        select(
            users.c.name,
            users.c.kind,
            users.c.created_at,
            profiles.c.display_name,
            profiles.c.avatar_url,
            profiles.c.about,
        )
        .select_from(users.outerjoin(profiles, profiles.c.user_name == users.c.name))
        .where(users.c.name == name)
    ).first()
    if row is None:
        return None
    return Profile(
        row.name,
        row.kind,
        row.display_name or "",
        row.avatar_url or "",
        row.about or "",
        float(row.created_at),
    )


def update_profile_txn(
    connection: Connection, name: str, changes: dict[str, str], now: float
) -> Profile | None:
    """Apply the changed fields (display_name, avatar_url, about); None: no such user."""
    current = profile_txn(connection, name)
    if current is None:
        return None
    values = {
        "display_name": changes.get("display_name", current.display_name),
        "avatar_url": changes.get("avatar_url", current.avatar_url),
        "about": changes.get("about", current.about),
        "updated_at": now,
    }
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(profiles).values(user_name=name, **values)
    connection.execute(
        statement.on_conflict_do_update(index_elements=[profiles.c.user_name], set_=values)
    )
    return profile_txn(connection, name)


def delete_account_txn(connection: Connection, name: str, now: float) -> list[str] | None:
    """Delete the account and what it owns; returns whom it was bound to (to tell them).

    Groups first, with the usual succession (an owned group gets a new owner), then
    the stored offline messages (they have no foreign key), then the user row, whose
    cascade takes profile, bindings, codes, fences, positions, SOS events, posts and
    likes. None when there was no such user.
    """
    if connection.execute(select(users.c.id).where(users.c.name == name)).first() is None:
        return None
    bound = bound_accounts_txn(connection, name)
    pending = connection.execute(
        select(bindings.c.guardian).where(bindings.c.device == name)
    ).scalars()
    bound = sorted(set(bound) | {str(guardian) for guardian in pending})
    leave_all_groups_txn(connection, name, now)
    connection.execute(delete(offline_msgs).where(offline_msgs.c.receiver_uid == name))
    connection.execute(delete(users).where(users.c.name == name))
    return bound
