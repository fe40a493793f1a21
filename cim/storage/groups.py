"""Transactions on ``groups``, ``group_members`` and ``group_invites``, run by
``Database.run``.

Unlike ``cim.storage.accounts``, these functions check permissions themselves and
raise ``GroupError`` subclasses: a rule such as "admins cannot remove admins" or "at
most N members" is only true when it is checked against the rows the same
transaction changes. Raising rolls the transaction back, so a refused request
changes nothing.

Every change first locks the group's row (``SELECT ... FOR UPDATE`` on PostgreSQL;
SQLite's ``BEGIN IMMEDIATE`` already serialises writers), so two requests on one
group, say two admins adding members to a nearly full group or the owner leaving
while someone is promoted, run one after the other instead of interleaving.

Nobody joins a group without consent (docs/privacy.md): creating a group with
members, adding and inviting follow ``cim.storage.contacts.admission``: a device is
added by one of its guardians, a person at once by a contact it lets add it, by
invitation otherwise (``cim.storage.group_invites`` answers invitations), and not at
all against its policy or its block.

Inputs are expected to be well-formed (names checked, lists de-duplicated):
``cim.groups`` does that before any database work. The shared refusals, records and
row helpers are in ``cim.storage.group_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from cim.storage.contacts import PrivacyDefaults
from cim.storage.group_rows import (
    _ROLE_RANK,
    ADMIN,
    MEMBER,
    OWNER,
    AmbiguousGroupName,
    BadGroupRequest,
    GroupConflict,
    GroupDissolved,
    GroupError,
    GroupForbidden,
    GroupFull,
    GroupNotAccepted,
    GroupNotFound,
    GroupRecord,
    LeaveRecord,
    MemberRecord,
    NoSuchUsers,
    _admit,
    _check_live,
    _check_users_exist,
    _count,
    _dissolve,
    _invite,
    _leave_locked,
    _lock_group,
    _record,
    _records,
    _require_role,
    _role_of,
    _roles,
)
from cim.storage.schema import group_invites, group_members, groups
from cim.storage.timeline import group_joined, group_left

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
    "GroupNotAccepted",
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
    "invite_members_txn",
    "leave_all_groups_txn",
    "leave_group_txn",
    "member_names_txn",
    "promote_members_txn",
    "remove_members_txn",
    "rename_group_txn",
]

_DEFAULTS = PrivacyDefaults()


def _join(connection: Connection, group_id: str, names: Sequence[str], now: float) -> None:
    if names:
        connection.execute(
            insert(group_members),
            [
                {"group_id": group_id, "user_name": name, "role": MEMBER, "joined_at": now}
                for name in names
            ],
        )
        group_joined(connection, group_id, names)
        connection.execute(
            delete(group_invites).where(
                group_invites.c.group_id == group_id, group_invites.c.user_name.in_(names)
            )
        )


# --- changes --------------------------------------------------------------------------


def create_group_txn(
    connection: Connection,
    group_id: str,
    name: str,
    owner: str,
    members: Sequence[str],
    now: float,
    max_members: int,
    defaults: PrivacyDefaults = _DEFAULTS,
) -> GroupRecord:
    """members excludes the owner: each is added or invited as ``_admit`` decides; the
    whole creation is refused for one that may not be, and for too many members."""
    if 1 + len(members) > max_members:
        raise BadGroupRequest(f"a group holds at most {max_members} members")
    _check_users_exist(connection, [owner])
    added, invited = _admit(connection, owner, members, defaults)
    connection.execute(insert(groups).values(id=group_id, name=name, owner=owner, created_at=now))
    connection.execute(
        insert(group_members).values(group_id=group_id, user_name=owner, role=OWNER, joined_at=now)
    )
    group_joined(connection, group_id, [owner])
    _join(connection, group_id, added, now)
    _invite(connection, group_id, invited, owner, now)
    return replace(_record(connection, group_id), invited=tuple(invited))


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
    defaults: PrivacyDefaults = _DEFAULTS,
    *,
    invite_only: bool = False,
) -> GroupRecord:
    """Users already in the group are left as they are: adding is "make sure they are in".

    The others are added or invited as ``_admit`` decides (``invite_only``: every
    person is invited); one that may not be refuses the whole request.
    """
    _lock_group(connection, group_id)
    doing = "invite members" if invite_only else "add members"
    _require_role(connection, group_id, actor, (OWNER, ADMIN), doing)
    present = _roles(connection, group_id, names)
    new = [name for name in names if name not in present]
    invited: list[str] = []
    if new:
        added, invited = _admit(connection, actor, new, defaults, invite_only=invite_only)
        if _count(connection, group_id) + len(added) > max_members:
            raise GroupFull(group_id, max_members)
        _join(connection, group_id, added, now)
        _invite(connection, group_id, invited, actor, now)
    return replace(_record(connection, group_id), invited=tuple(invited))


def invite_members_txn(
    connection: Connection,
    group_id: str,
    actor: str,
    names: Sequence[str],
    now: float,
    max_members: int,
    defaults: PrivacyDefaults = _DEFAULTS,
) -> GroupRecord:
    """Invite rather than add, whatever the invitees' ``group_adds`` (a guardian's own
    device is still added at once: devices take no invitations)."""
    return add_members_txn(
        connection, group_id, actor, names, now, max_members, defaults, invite_only=True
    )


def remove_members_txn(
    connection: Connection, group_id: str, actor: str, names: Sequence[str]
) -> GroupRecord:
    """Members go, and invitations waiting for an answer are withdrawn; names that are
    neither are refused, so a typo is reported rather than ignored."""
    _lock_group(connection, group_id)
    role = _require_role(connection, group_id, actor, (OWNER, ADMIN), "remove members")
    if actor in names:
        raise BadGroupRequest("to remove yourself, leave the group")
    present = _roles(connection, group_id, names)
    withdrawn = (
        connection.execute(
            delete(group_invites)
            .where(
                group_invites.c.group_id == group_id,
                group_invites.c.user_name.in_([name for name in names if name not in present]),
            )
            .returning(group_invites.c.user_name)
        )
        .scalars()
        .all()
    )
    missing = [name for name in names if name not in present and name not in withdrawn]
    if missing:
        raise GroupNotFound(
            f"not a member of group {group_id}: " + ", ".join(repr(name) for name in missing)
        )
    if role == ADMIN:
        protected = [name for name in names if present.get(name) in (OWNER, ADMIN)]
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
    group_left(connection, group_id, names)
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
