"""Transactions on profiles and on deleting an account with everything it owns."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from cim.storage.bindings import PENDING, bound_accounts_txn, first_guardian_txn
from cim.storage.groups import LeaveRecord, leave_all_groups_txn
from cim.storage.schema import bindings, profiles, users
from cim.storage.timeline import forget_user


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


@dataclass(frozen=True)
class DeletedAccount:
    told: list[str]
    """Who had a binding with it, active or pending, or must approve one of its
    pending requests: they are told it is gone."""
    left_groups: list[LeaveRecord]
    """The groups it was taken out of (their cached member lists are stale now)."""


def delete_account_txn(connection: Connection, name: str, now: float) -> DeletedAccount | None:
    """Delete the account and what it owns; says whom to tell and which groups changed.

    The user row is locked first, so two deletions at once run one after the other
    and the second finds nothing (None, as for no such user) instead of telling
    everyone twice. Groups next, with the usual succession (an owned group gets a new
    owner), then its one-to-one timelines and cursors (no foreign keys), then the user
    row, whose cascade takes profile, bindings, codes, fences, positions, SOS events,
    posts and likes.
    """
    locked = connection.execute(
        select(users.c.id).where(users.c.name == name).with_for_update()
    ).first()
    if locked is None:
        return None
    told = set(bound_accounts_txn(connection, name))
    rows = connection.execute(
        select(bindings.c.device, bindings.c.guardian, bindings.c.status).where(
            or_(bindings.c.device == name, bindings.c.guardian == name)
        )
    ).all()
    for row in rows:
        if row.status != PENDING:
            continue
        if row.device == name:
            told.add(str(row.guardian))
            continue
        # Its own request to a device: the device and whoever would approve it.
        told.add(str(row.device))
        first = first_guardian_txn(connection, str(row.device))
        if first is not None:
            told.add(first)
    left = leave_all_groups_txn(connection, name, now)
    # Its one-to-one timelines go too: they are read by name, and the name is free
    # to register again, so whoever took it next would otherwise read these chats.
    forget_user(connection, name)
    deleted = connection.execute(delete(users).where(users.c.name == name))
    if deleted.rowcount != 1:
        return None
    return DeletedAccount(sorted(told), left)
