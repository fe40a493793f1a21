"""What the group transactions share: refusals, records, and the row helpers.

``cim.storage.groups`` (creating and changing groups) and ``cim.storage.group_invites``
(answering invitations) both work on the rows through these; callers import the
refusals and records from ``cim.storage.groups``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.engine import Connection, Row

from cim.storage.contacts import (
    DEVICE,
    INVITE,
    PrivacyDefaults,
    admission,
    insert_missing,
    standings_txn,
)
from cim.storage.schema import group_invites, group_members, groups, users
from cim.storage.timeline import group_left

OWNER = "owner"
ADMIN = "admin"
MEMBER = "member"


# --- errors ---------------------------------------------------------------------------


class GroupError(Exception):
    """A refused group request: ``code`` is for programs, ``message`` for people.

    The codes are the ones ``GroupAnswer.error`` carries on the wire.
    """

    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class GroupNotFound(GroupError):
    code = "not_found"


class GroupForbidden(GroupError):
    code = "forbidden"


class BadGroupRequest(GroupError):
    code = "bad_request"


class GroupConflict(GroupError):
    code = "conflict"


class NoSuchUsers(GroupNotFound):
    """Some of the users to add have no account."""

    def __init__(self, users: Sequence[str]) -> None:
        super().__init__("no such user: " + ", ".join(repr(user) for user in users))
        self.users = tuple(users)


class GroupNotAccepted(GroupError):
    """Some of the users to add or invite have no account, or do not accept it from the
    actor (their policy, a block, a device not theirs): one answer for both."""

    code = "not_accepted"

    def __init__(self, users: Sequence[str]) -> None:
        named = ", ".join(repr(user) for user in users)
        super().__init__(
            f"not accepted: {named}: no such user, or they do not accept this from you"
        )
        self.users = tuple(users)


class GroupDissolved(GroupConflict):
    def __init__(self, group_id: str) -> None:
        super().__init__(f"group {group_id} was dissolved")
        self.group_id = group_id


class GroupFull(GroupConflict):
    def __init__(self, group_id: str, limit: int) -> None:
        super().__init__(f"group {group_id} would exceed {limit} members")
        self.group_id = group_id
        self.limit = limit


class AmbiguousGroupName(BadGroupRequest):
    """A name that several of the user's groups carry: only the id can say which."""

    def __init__(self, name: str, group_ids: Sequence[str]) -> None:
        super().__init__(
            f"{len(group_ids)} of your groups are named {name!r} "
            f"({', '.join(group_ids)}): use the group id"
        )
        self.name = name
        self.group_ids = tuple(group_ids)


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRecord:
    id: str
    name: str
    owner: str
    admins: tuple[str, ...]  # longest-standing first
    member_count: int
    created_at: float
    invited: tuple[str, ...] = ()
    """create, add, invite: who of the request was invited rather than added (they
    join when they accept)."""


@dataclass(frozen=True)
class MemberRecord:
    user: str
    role: str
    joined_at: float


@dataclass(frozen=True)
class LeaveRecord:
    """What leaving did, so the caller can tell the others (a system message, say)."""

    group_id: str
    new_owner: str | None  # set when the owner left and the group lives on
    dissolved: bool  # the last member left


# --- helpers --------------------------------------------------------------------------

_ROLE_RANK = case((group_members.c.role == OWNER, 0), (group_members.c.role == ADMIN, 1), else_=2)
"""Owner, then admins, then members: the order listings and successions use."""


def _lock_group(connection: Connection, group_id: str) -> Row[Any]:
    """The live group's row, locked until commit; refuses unknown and dissolved groups."""
    row = connection.execute(
        select(groups).where(groups.c.id == group_id).with_for_update()
    ).first()
    if row is None:
        raise GroupNotFound(f"no such group: {group_id}")
    if row.dissolved_at is not None:
        raise GroupDissolved(group_id)
    return row


def _check_live(connection: Connection, group_id: str) -> None:
    """For reads, which need no lock."""
    row = connection.execute(select(groups.c.dissolved_at).where(groups.c.id == group_id)).first()
    if row is None:
        raise GroupNotFound(f"no such group: {group_id}")
    if row.dissolved_at is not None:
        raise GroupDissolved(group_id)


def _roles(connection: Connection, group_id: str, names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    if not names:
        return {}
    rows = connection.execute(
        select(group_members.c.user_name, group_members.c.role).where(
            group_members.c.group_id == group_id, group_members.c.user_name.in_(names)
        )
    ).all()
    return {row.user_name: row.role for row in rows}


def _role_of(connection: Connection, group_id: str, user: str) -> str | None:
    return _roles(connection, group_id, [user]).get(user)


def _require_role(
    connection: Connection, group_id: str, actor: str, allowed: tuple[str, ...], doing: str
) -> str:
    role = _role_of(connection, group_id, actor)
    if role is None:
        raise GroupForbidden(f"{actor} is not a member of group {group_id}")
    if role not in allowed:
        who = "the owner" if allowed == (OWNER,) else "the owner or an admin"
        raise GroupForbidden(f"only {who} can {doing}")
    return role


def _check_users_exist(connection: Connection, names: Sequence[str]) -> None:
    """Refuse unknown users, and hold their rows until commit.

    ``FOR KEY SHARE`` on PostgreSQL makes a concurrent account deletion wait for this
    transaction instead of slipping in between the check and the insert.
    """
    found = set(
        connection.execute(
            select(users.c.name)
            .where(users.c.name.in_(names))
            .with_for_update(read=True, key_share=True)
        ).scalars()
    )
    missing = [name for name in names if name not in found]
    if missing:
        raise NoSuchUsers(missing)


def _admit(
    connection: Connection,
    actor: str,
    names: Sequence[str],
    defaults: PrivacyDefaults,
    *,
    invite_only: bool = False,
) -> tuple[list[str], list[str]]:
    """Split ``names`` into those ``actor`` adds now and those it invites (docs/privacy.md).

    A device is added only by one of its guardians, and then at once; a person whose
    ``group_adds`` is ``contacts`` is added at once by a contact (unless
    ``invite_only``), invited otherwise when their message policy lets the actor reach
    them. Anyone else, a name without an account included, refuses the whole request
    with one answer. The rows read stay locked until commit (see ``standings_txn``).
    """
    if _kind(connection, actor) == DEVICE:
        raise GroupForbidden("a device's groups are chosen by its guardians")
    standings = standings_txn(connection, actor, names, lock=True)
    added: list[str] = []
    invited: list[str] = []
    refused: list[str] = []
    for name in names:
        standing = standings.get(name)
        way = admission(standing, defaults)
        if way is None:
            refused.append(name)
        elif way == INVITE or (invite_only and standing is not None and standing.kind != DEVICE):
            invited.append(name)
        else:
            added.append(name)
    if refused:
        raise GroupNotAccepted(refused)
    return added, invited


def _kind(connection: Connection, name: str) -> str | None:
    row = connection.execute(select(users.c.kind).where(users.c.name == name)).first()
    return None if row is None else str(row.kind)


def _invite(
    connection: Connection, group_id: str, names: Sequence[str], actor: str, now: float
) -> None:
    """Invitations for ``names``; one already waiting stays as it was."""
    rows = [
        {"group_id": group_id, "user_name": name, "invited_by": actor, "created_at": now}
        for name in names
    ]
    insert_missing(connection, group_invites, rows)


def _count(connection: Connection, group_id: str) -> int:
    return int(
        connection.execute(
            select(func.count())
            .select_from(group_members)
            .where(group_members.c.group_id == group_id)
        ).scalar_one()
    )


def _records(connection: Connection, group_rows: Sequence[Row[Any]]) -> list[GroupRecord]:
    ids = [row.id for row in group_rows]
    if not ids:
        return []
    counts: dict[str, int] = dict(
        connection.execute(
            select(group_members.c.group_id, func.count())
            .where(group_members.c.group_id.in_(ids))
            .group_by(group_members.c.group_id)
        )
        .tuples()
        .all()
    )
    admins: dict[str, list[str]] = {group_id: [] for group_id in ids}
    for group_id, name in connection.execute(
        select(group_members.c.group_id, group_members.c.user_name)
        .where(group_members.c.group_id.in_(ids), group_members.c.role == ADMIN)
        .order_by(group_members.c.joined_at, group_members.c.user_name)
    ).tuples():
        admins[group_id].append(name)
    return [
        GroupRecord(
            id=row.id,
            name=row.name,
            owner=row.owner,
            admins=tuple(admins[row.id]),
            member_count=int(counts.get(row.id, 0)),
            created_at=row.created_at,
        )
        for row in group_rows
    ]


def _record(connection: Connection, group_id: str) -> GroupRecord:
    row = connection.execute(select(groups).where(groups.c.id == group_id)).one()
    return _records(connection, [row])[0]


def _dissolve(connection: Connection, group_id: str, now: float) -> list[str]:
    names = list(
        connection.execute(
            select(group_members.c.user_name)
            .where(group_members.c.group_id == group_id)
            .order_by(_ROLE_RANK, group_members.c.joined_at, group_members.c.user_name)
        ).scalars()
    )
    connection.execute(delete(group_members).where(group_members.c.group_id == group_id))
    group_left(connection, group_id, None)
    connection.execute(delete(group_invites).where(group_invites.c.group_id == group_id))
    connection.execute(update(groups).where(groups.c.id == group_id).values(dissolved_at=now))
    return names


def _leave_locked(connection: Connection, group: Row[Any], user: str, now: float) -> LeaveRecord:
    group_id = group.id
    role = _role_of(connection, group_id, user)
    if role is None:
        raise GroupForbidden(f"{user} is not a member of group {group_id}")
    if role != OWNER:
        connection.execute(
            delete(group_members).where(
                group_members.c.group_id == group_id, group_members.c.user_name == user
            )
        )
        group_left(connection, group_id, [user])
        return LeaveRecord(group_id, None, False)
    successor = connection.execute(
        select(group_members.c.user_name)
        .where(group_members.c.group_id == group_id, group_members.c.user_name != user)
        .order_by(_ROLE_RANK, group_members.c.joined_at, group_members.c.user_name)
        .limit(1)
    ).scalar()
    if successor is None:
        _dissolve(connection, group_id, now)
        return LeaveRecord(group_id, None, True)
    connection.execute(
        delete(group_members).where(
            group_members.c.group_id == group_id, group_members.c.user_name == user
        )
    )
    group_left(connection, group_id, [user])
    connection.execute(
        update(group_members)
        .where(group_members.c.group_id == group_id, group_members.c.user_name == successor)
        .values(role=OWNER)
    )
    connection.execute(update(groups).where(groups.c.id == group_id).values(owner=successor))
    return LeaveRecord(group_id, successor, False)
