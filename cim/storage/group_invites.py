"""Transactions on group invitations: the invitee's list, accepting and declining.

Invitations are made by ``cim.storage.groups`` (create, add, invite); an invitation
waits until its invitee answers, the group is dissolved, an admin withdraws it
(``remove``), the invitee blocks its inviter, or either account is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from cim.storage.group_rows import (
    MEMBER,
    GroupFull,
    GroupNotFound,
    GroupRecord,
    _count,
    _lock_group,
    _record,
    _records,
    _role_of,
)
from cim.storage.schema import group_invites, group_members, groups
from cim.storage.timeline import group_joined

__all__ = [
    "InvitationRecord",
    "accept_invitation_txn",
    "decline_invitation_txn",
    "find_invitations_txn",
    "invitations_txn",
]


@dataclass(frozen=True)
class InvitationRecord:
    group: GroupRecord
    invited_by: str
    invited_at: float


def invitations_txn(connection: Connection, user: str) -> list[InvitationRecord]:
    """The user's invitations to live groups, oldest first."""
    rows = connection.execute(
        select(group_invites.c.group_id, group_invites.c.invited_by, group_invites.c.created_at)
        .join(groups, groups.c.id == group_invites.c.group_id)
        .where(group_invites.c.user_name == user, groups.c.dissolved_at.is_(None))
        .order_by(group_invites.c.created_at, group_invites.c.group_id)
    ).all()
    if not rows:
        return []
    group_rows = connection.execute(
        select(groups).where(groups.c.id.in_([row.group_id for row in rows]))
    ).all()
    records = {record.id: record for record in _records(connection, group_rows)}
    return [
        InvitationRecord(records[row.group_id], row.invited_by, float(row.created_at))
        for row in rows
    ]


def find_invitations_txn(connection: Connection, user: str, ref: str) -> list[str]:
    """What ``ref`` may mean to an invitee: the id of a group it is invited to, or the
    ids of its invitations to live groups of that name."""
    return list(
        connection.execute(
            select(group_invites.c.group_id)
            .join(groups, groups.c.id == group_invites.c.group_id)
            .where(
                group_invites.c.user_name == user,
                groups.c.dissolved_at.is_(None),
                (groups.c.id == ref) | (groups.c.name == ref),
            )
            .order_by(group_invites.c.created_at, group_invites.c.group_id)
        ).scalars()
    )


def _take_invitation(connection: Connection, group_id: str, user: str) -> None:
    taken = connection.execute(
        delete(group_invites).where(
            group_invites.c.group_id == group_id, group_invites.c.user_name == user
        )
    )
    if not taken.rowcount:
        raise GroupNotFound(f"no invitation to group {group_id} is waiting for you")


def accept_invitation_txn(
    connection: Connection, group_id: str, user: str, now: float, max_members: int
) -> GroupRecord:
    """The invitee joins as a member; refused when the group is full or dissolved."""
    _lock_group(connection, group_id)
    _take_invitation(connection, group_id, user)
    if _role_of(connection, group_id, user) is None:
        if _count(connection, group_id) + 1 > max_members:
            raise GroupFull(group_id, max_members)
        connection.execute(
            group_members.insert().values(
                group_id=group_id, user_name=user, role=MEMBER, joined_at=now
            )
        )
        group_joined(connection, group_id, [user])
    return _record(connection, group_id)


def decline_invitation_txn(connection: Connection, group_id: str, user: str) -> None:
    """The invitation goes; the inviter is not told."""
    _take_invitation(connection, group_id, user)
