"""Transactions on ``groups`` and ``group_members``, run by ``Database.run``.

Unlike ``cim.storage.accounts``, these functions check permissions themselves and
raise ``GroupError`` subclasses: a rule such as "admins cannot remove admins" or "at
most N members" is only true when it is checked against the rows the same
transaction changes. Raising rolls the transaction back, so a refused request
changes nothing.

Every change first locks the group's row (``SELECT ... FOR UPDATE`` on PostgreSQL;
SQLite's ``BEGIN IMMEDIATE`` already serialises writers), so two requests on one
group, say two admins adding members to a nearly full group or the owner leaving
while someone is promoted, run one after the other instead of interleaving.

Inputs are expected to be well-formed (names checked, lists de-duplicated):
``cim.groups`` does that before any database work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Row

from cim.storage.schema import group_members, groups, users

OWNER = "owner"
ADMIN = "admin"
MEMBER = "member"

__all__ = [
    "ADMIN",
    "MEMBER",
    "OWNER",
    "AmbiguousGroupName",
    "BadGroupRequest",
    "GroupConflict",
    "GroupDissolved",
    "GroupError",
    "GroupForbidden",
    "GroupFull",
    "GroupNotFound",
    "GroupRecord",
    "LeaveRecord",
    "MemberRecord",
    "NoSuchUsers",
    "add_members_txn",
    "all_groups_txn",
    "create_group_txn",
    "dissolve_group_txn",
    "find_groups_txn",
    "group_detail_txn",
    "group_members_txn",
    "groups_of_txn",
    "leave_all_groups_txn",
    "leave_group_txn",
    "member_names_txn",
    "promote_members_txn",
    "remove_members_txn",
    "rename_group_txn",
]


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
    connection.execute(
        update(group_members)
        .where(group_members.c.group_id == group_id, group_members.c.user_name == successor)
        .values(role=OWNER)
    )
    connection.execute(update(groups).where(groups.c.id == group_id).values(owner=successor))
    return LeaveRecord(group_id, successor, False)


# --- changes --------------------------------------------------------------------------


def create_group_txn(
    connection: Connection,
    group_id: str,
    name: str,
    owner: str,
    members: Sequence[str],
    now: float,
    max_members: int,
) -> GroupRecord:
    """members excludes the owner; refuses unknown users and too many members."""
    everyone = [owner, *members]
    if len(everyone) > max_members:
        raise BadGroupRequest(f"a group holds at most {max_members} members")
    _check_users_exist(connection, everyone)
    connection.execute(insert(groups).values(id=group_id, name=name, owner=owner, created_at=now))
    connection.execute(
        insert(group_members),
        [
            {
                "group_id": group_id,
                "user_name": user,
                "role": OWNER if i == 0 else MEMBER,
                "joined_at": now,
            }
            for i, user in enumerate(everyone)
        ],
    )
    return _record(connection, group_id)


def rename_group_txn(connection: Connection, group_id: str, actor: str, name: str) -> GroupRecord:
    _lock_group(connection, group_id)
    _require_role(connection, group_id, actor, (OWNER, ADMIN), "rename the group")
    connection.execute(update(groups).where(groups.c.id == group_id).values(name=name))
    return _record(connection, group_id)


def add_members_txn(
    connection: Connection,
    group_id: str,
    actor: str,
    names: Sequence[str],
    now: float,
    max_members: int,
) -> GroupRecord:
    """Users already in the group are left as they are: adding is "make sure they are in"."""
    _lock_group(connection, group_id)
    _require_role(connection, group_id, actor, (OWNER, ADMIN), "add members")
    present = _roles(connection, group_id, names)
    new = [name for name in names if name not in present]
    if new:
        _check_users_exist(connection, new)
        if _count(connection, group_id) + len(new) > max_members:
            raise GroupFull(group_id, max_members)
        connection.execute(
            insert(group_members),
            [
                {"group_id": group_id, "user_name": name, "role": MEMBER, "joined_at": now}
                for name in new
            ],
        )
    return _record(connection, group_id)


def remove_members_txn(
    connection: Connection, group_id: str, actor: str, names: Sequence[str]
) -> GroupRecord:
    """Refuses names that are not members, so a typo is reported rather than ignored."""
    _lock_group(connection, group_id)
    role = _require_role(connection, group_id, actor, (OWNER, ADMIN), "remove members")
    if actor in names:
        raise BadGroupRequest("to remove yourself, leave the group")
    present = _roles(connection, group_id, names)
    missing = [name for name in names if name not in present]
    if missing:
        raise GroupNotFound(
            f"not a member of group {group_id}: " + ", ".join(repr(name) for name in missing)
        )
    if role == ADMIN:
        protected = [name for name in names if present[name] in (OWNER, ADMIN)]
        if protected:
            raise GroupForbidden(
                "an admin cannot remove the owner or another admin: "
                + ", ".join(repr(name) for name in protected)
            )
    connection.execute(
        delete(group_members).where(
            group_members.c.group_id == group_id, group_members.c.user_name.in_(names)
        )
    )
    return _record(connection, group_id)


def promote_members_txn(
    connection: Connection, group_id: str, actor: str, names: Sequence[str]
) -> GroupRecord:
    """Owner only; members become admins, admins stay admins."""
    _lock_group(connection, group_id)
    _require_role(connection, group_id, actor, (OWNER,), "promote members")
    present = _roles(connection, group_id, names)
    missing = [name for name in names if name not in present]
    if missing:
        raise GroupNotFound(
            f"not a member of group {group_id}: " + ", ".join(repr(name) for name in missing)
        )
    if actor in names:
        raise BadGroupRequest("the owner already outranks an admin")
    connection.execute(
        update(group_members)
        .where(
            group_members.c.group_id == group_id,
            group_members.c.user_name.in_(names),
            group_members.c.role == MEMBER,
        )
        .values(role=ADMIN)
    )
    return _record(connection, group_id)


def leave_group_txn(connection: Connection, group_id: str, user: str, now: float) -> LeaveRecord:
    """The owner's leaving hands the group to the longest-standing admin, else member.

    "Longest-standing" is the earliest ``joined_at``; members who joined at the same
    moment (say, all those named at creation) are taken in name order.
    """
    group = _lock_group(connection, group_id)
    return _leave_locked(connection, group, user, now)


def dissolve_group_txn(connection: Connection, group_id: str, actor: str, now: float) -> list[str]:
    """Owner only; returns the former members (owner first) so they can be told."""
    _lock_group(connection, group_id)
    _require_role(connection, group_id, actor, (OWNER,), "dissolve the group")
    return _dissolve(connection, group_id, now)


def leave_all_groups_txn(connection: Connection, user: str, now: float) -> list[LeaveRecord]:
    """Take a user out of every group, with the usual succession; before deleting them.

    Deleting the account alone would cascade the member rows away and leave an owned
    group without an owner. Groups are locked in id order so that two of these running
    at once cannot deadlock.
    """
    ids = (
        connection.execute(
            select(group_members.c.group_id)
            .where(group_members.c.user_name == user)
            .order_by(group_members.c.group_id)
        )
        .scalars()
        .all()
    )
    outcomes = []
    for group_id in ids:
        group = connection.execute(
            select(groups).where(groups.c.id == group_id).with_for_update()
        ).one()
        outcomes.append(_leave_locked(connection, group, user, now))
    return outcomes


# --- reads ----------------------------------------------------------------------------


def groups_of_txn(connection: Connection, user: str) -> list[GroupRecord]:
    """The user's groups, by name and then id; dissolved groups have no members left."""
    mine = select(group_members.c.group_id).where(group_members.c.user_name == user)
    rows = connection.execute(
        select(groups)
        .where(groups.c.id.in_(mine), groups.c.dissolved_at.is_(None))
        .order_by(groups.c.name, groups.c.id)
    ).all()
    return _records(connection, rows)


def group_members_txn(connection: Connection, group_id: str, actor: str) -> list[MemberRecord]:
    """Members only: owner, then admins, then members, each longest-standing first."""
    _check_live(connection, group_id)
    if _role_of(connection, group_id, actor) is None:
        raise GroupForbidden(f"only members can see the members of group {group_id}")
    rows = connection.execute(
        select(group_members.c.user_name, group_members.c.role, group_members.c.joined_at)
        .where(group_members.c.group_id == group_id)
        .order_by(_ROLE_RANK, group_members.c.joined_at, group_members.c.user_name)
    ).all()
    return [MemberRecord(row.user_name, row.role, row.joined_at) for row in rows]


def member_names_txn(connection: Connection, group_id: str) -> list[str]:
    """Every member's name, sorted; empty for an unknown or dissolved group."""
    return list(
        connection.execute(
            select(group_members.c.user_name)
            .where(group_members.c.group_id == group_id)
            .order_by(group_members.c.user_name)
        ).scalars()
    )


def find_groups_txn(connection: Connection, user: str, ref: str) -> list[str]:
    """What ref may mean to user: ``[ref]`` when it is a group's id, else the ids of
    the user's live groups named ref (none, one, or several when the name is ambiguous).
    """
    if connection.execute(select(groups.c.id).where(groups.c.id == ref)).first() is not None:
        return [ref]
    return list(
        connection.execute(
            select(groups.c.id)
            .join(group_members, group_members.c.group_id == groups.c.id)
            .where(
                group_members.c.user_name == user,
                groups.c.name == ref,
                groups.c.dissolved_at.is_(None),
            )
            .order_by(groups.c.created_at, groups.c.id)
        ).scalars()
    )


# --- administration (cimctl group list|show): no actor, no permission checks ---------


def all_groups_txn(connection: Connection) -> list[GroupRecord]:
    """Every live group, by name and then id."""
    rows = connection.execute(
        select(groups).where(groups.c.dissolved_at.is_(None)).order_by(groups.c.name, groups.c.id)
    ).all()
    return _records(connection, rows)


def group_detail_txn(connection: Connection, ref: str) -> tuple[GroupRecord, list[MemberRecord]]:
    """A live group by id, or by name when exactly one live group has it, with its
    members (owner, then admins, then members). GroupNotFound, AmbiguousGroupName."""
    row = connection.execute(
        select(groups).where(groups.c.id == ref, groups.c.dissolved_at.is_(None))
    ).first()
    if row is None:
        rows = connection.execute(
            select(groups)
            .where(groups.c.name == ref, groups.c.dissolved_at.is_(None))
            .order_by(groups.c.created_at, groups.c.id)
        ).all()
        if not rows:
            raise GroupNotFound(f"no such group: {ref}")
        if len(rows) > 1:
            raise AmbiguousGroupName(ref, [r.id for r in rows])
        row = rows[0]
    members = connection.execute(
        select(group_members.c.user_name, group_members.c.role, group_members.c.joined_at)
        .where(group_members.c.group_id == row.id)
        .order_by(_ROLE_RANK, group_members.c.joined_at, group_members.c.user_name)
    ).all()
    return _records(connection, [row])[0], [
        MemberRecord(m.user_name, m.role, m.joined_at) for m in members
    ]
