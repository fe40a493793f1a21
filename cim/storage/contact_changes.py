"""Transactions that change contacts, contact requests, blocks and settings.

Each runs for an ``owner`` (the actor itself, or a device it actively guards:
``act_txn`` finds out which) and returns a ``Change`` saying whom to tell and whose
remembered decisions are stale. The rules they apply are ``cim.storage.contacts``'s;
refusals are its ``ContactError`` subclasses, raised before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.engine import Connection

from cim.storage.bindings import account_kind_txn
from cim.storage.contacts import (
    DEVICE,
    BadContactRequest,
    ContactConflict,
    ContactForbidden,
    ContactNotFound,
    NotAccepted,
    PrivacyDefaults,
    Settings,
    deciders_txn,
    insert_missing,
    not_accepted_reason,
    owner_txn,
    settings_txn,
    standings_txn,
)
from cim.storage.schema import (
    GROUP_ADDS,
    MESSAGE_POLICIES,
    READ_RECEIPTS,
    blocks,
    contact_requests,
    contacts,
    group_invites,
    users,
)

__all__ = [
    "Change",
    "ChangeTxn",
    "accept_txn",
    "act_txn",
    "block_txn",
    "decline_txn",
    "remove_txn",
    "request_txn",
    "set_settings_txn",
    "unblock_txn",
]


@dataclass(frozen=True)
class Change:
    """What a change did, so the caller can tell people and drop cached decisions."""

    status: str
    """``requested``, ``accepted`` (a contact now), ``removed``, ``blocked``, ..."""
    told: dict[str, dict[str, str]]
    """Receiver -> the fields of the notice it gets (none for a silent change)."""
    touched: tuple[str, ...]
    """Accounts whose decisions changed."""


# --- changes --------------------------------------------------------------------------


def _widening(connection: Connection, actor: str, owner: str) -> None:
    """Adding a contact to a device takes a guardian: the device cannot do it itself."""
    if actor == owner and account_kind_txn(connection, actor) == DEVICE:
        raise ContactForbidden(
            "a device's contacts are chosen by its guardians: ask one of them to do it"
        )


def _pair(
    connection: Connection, first: str, second: str, approvals: dict[str, str | None], now: float
) -> None:
    """Both rows of a contact, and no request left between the two."""
    insert_missing(
        connection,
        contacts,
        [
            {"user_name": side, "contact": other, "created_at": now, "approved_by": approvals[side]}
            for side, other in ((first, second), (second, first))
        ],
    )
    _drop_requests(connection, first, second)


def _drop_requests(connection: Connection, first: str, second: str) -> int:
    result = connection.execute(
        delete(contact_requests).where(
            or_(
                and_(contact_requests.c.requester == first, contact_requests.c.target == second),
                and_(contact_requests.c.requester == second, contact_requests.c.target == first),
            )
        )
    )
    return int(result.rowcount or 0)


def _unpair(connection: Connection, first: str, second: str) -> int:
    result = connection.execute(
        delete(contacts).where(
            or_(
                and_(contacts.c.user_name == first, contacts.c.contact == second),
                and_(contacts.c.user_name == second, contacts.c.contact == first),
            )
        )
    )
    return int(result.rowcount or 0)


def _approval(connection: Connection, actor: str, side: str) -> str | None:
    """Who consented for ``side``: a guardian for a device, nobody to record for a person."""
    return actor if actor != side and account_kind_txn(connection, side) == DEVICE else None


def _added(connection: Connection, first: str, second: str) -> dict[str, dict[str, str]]:
    """The "contact.added" notice: each account, and whoever answers for a device."""
    told: dict[str, dict[str, str]] = {}
    for side, other in ((first, second), (second, first)):
        for receiver in {side, *deciders_txn(connection, side)}:
            told[receiver] = {"event": "contact.added", "account": side, "contact": other}
    return told


def request_txn(connection: Connection, actor: str, owner: str, target: str, now: float) -> Change:
    """``owner`` (or ``actor`` for it) asks ``target`` to be a contact.

    Refused like a message to a name without an account when ``target`` has none or
    has blocked the owner. A request the target already made the other way is
    accepted instead (both sides have consented); asking again changes nothing.
    """
    _widening(connection, actor, owner)
    if target == owner:
        raise BadContactRequest("you cannot be your own contact")
    standing = standings_txn(connection, owner, [target], lock=True).get(target)
    if standing is None or standing.blocked:
        raise NotAccepted(not_accepted_reason(target))
    if standing.contact:
        return Change("accepted", {}, ())
    if _blocked(connection, owner, target):
        raise ContactConflict(f"you blocked {target!r}: unblock them first")
    reverse = connection.execute(
        select(contact_requests.c.requested_by).where(
            contact_requests.c.requester == target, contact_requests.c.target == owner
        )
    ).first()
    if reverse is not None:
        approvals = {
            owner: _approval(connection, actor, owner),
            target: _approval(connection, reverse.requested_by, target),
        }
        _pair(connection, owner, target, approvals, now)
        return Change("accepted", _added(connection, owner, target), (owner, target))
    asked = insert_missing(
        connection,
        contact_requests,
        [{"requester": owner, "target": target, "requested_by": actor, "created_at": now}],
    )
    if not asked:
        return Change("requested", {}, ())  # it was waiting already: nobody is told again
    notice = {"event": "contact.requested", "from": owner, "to": target, "requested_by": actor}
    told = {receiver: notice for receiver in deciders_txn(connection, target)}
    return Change("requested", told, ())


def accept_txn(
    connection: Connection, actor: str, owner: str, requester: str, now: float
) -> Change:
    _widening(connection, actor, owner)
    row = connection.execute(
        select(contact_requests.c.requested_by).where(
            contact_requests.c.requester == requester, contact_requests.c.target == owner
        )
    ).first()
    if row is None:
        raise ContactNotFound(f"no request from {requester!r} is waiting")
    approvals = {
        owner: _approval(connection, actor, owner),
        requester: _approval(connection, row.requested_by, requester),
    }
    _pair(connection, owner, requester, approvals, now)
    return Change("accepted", _added(connection, owner, requester), (owner, requester))


def decline_txn(
    connection: Connection, actor: str, owner: str, requester: str, now: float
) -> Change:
    """The requester is not told: it only sees its request gone."""
    declined = connection.execute(
        delete(contact_requests).where(
            contact_requests.c.requester == requester, contact_requests.c.target == owner
        )
    )
    if not declined.rowcount:
        raise ContactNotFound(f"no request from {requester!r} is waiting")
    return Change("declined", {}, ())


def remove_txn(connection: Connection, actor: str, owner: str, other: str, now: float) -> Change:
    """End a contact (both sides at once) or withdraw the owner's own request."""
    removed = _unpair(connection, owner, other)
    withdrawn = connection.execute(
        delete(contact_requests).where(
            contact_requests.c.requester == owner, contact_requests.c.target == other
        )
    )
    if not removed and not withdrawn.rowcount:
        raise ContactNotFound(f"{other!r} is neither a contact nor waiting for your answer")
    return Change("removed", {}, (owner, other) if removed else ())


def _blocked(connection: Connection, user: str, other: str) -> bool:
    row = connection.execute(
        select(blocks.c.user_name).where(blocks.c.user_name == user, blocks.c.blocked == other)
    ).first()
    return row is not None


def block_txn(connection: Connection, actor: str, owner: str, other: str, now: float) -> Change:
    """Refuse everything from ``other``: the contact, the requests both ways and the
    group invitations ``other`` sent the owner go; ``other`` is not told."""
    if other == owner:
        raise BadContactRequest("you cannot block yourself")
    standing = standings_txn(connection, other, [owner], lock=True).get(owner)
    if standing is None or standing.other_kind is None:
        raise ContactNotFound("no such user")
    if standing.family:
        raise ContactConflict(
            f"{other!r} shares a device binding with this account: remove the binding instead"
        )
    insert_missing(connection, blocks, [{"user_name": owner, "blocked": other, "created_at": now}])
    _unpair(connection, owner, other)
    _drop_requests(connection, owner, other)
    connection.execute(
        delete(group_invites).where(
            group_invites.c.user_name == owner, group_invites.c.invited_by == other
        )
    )
    return Change("blocked", {}, (owner, other))


def unblock_txn(connection: Connection, actor: str, owner: str, other: str, now: float) -> Change:
    """Only the block goes; a contact it ended stays ended."""
    removed = connection.execute(
        delete(blocks).where(blocks.c.user_name == owner, blocks.c.blocked == other)
    )
    if not removed.rowcount:
        raise ContactNotFound(f"{other!r} is not blocked")
    return Change("unblocked", {}, (owner, other))


def set_settings_txn(
    connection: Connection,
    user: str,
    messages: str | None,
    group_adds: str | None,
    defaults: PrivacyDefaults,
    read_receipts: str | None = None,
) -> Settings:
    """Change a person's settings (None: unchanged); a device's are not its own, except
    read receipts (whether others see what it read), which any account chooses."""
    kind = account_kind_txn(connection, user)
    if kind is None:
        raise ContactNotFound("no such user")
    if read_receipts is not None and read_receipts not in READ_RECEIPTS:
        raise BadContactRequest(f"read_receipts: expected one of {', '.join(READ_RECEIPTS)}")
    if read_receipts is not None:
        connection.execute(
            update(users).where(users.c.name == user).values(read_receipts=read_receipts)
        )
    if kind == DEVICE and messages is None and group_adds is None:
        return settings_txn(connection, user, defaults)
    if kind == DEVICE:
        raise ContactForbidden(
            "a device takes messages only from its guardians and the contacts they "
            "approved; its settings cannot change"
        )
    if messages is not None and messages not in MESSAGE_POLICIES:
        raise BadContactRequest(f"messages: expected one of {', '.join(MESSAGE_POLICIES)}")
    if group_adds is not None and group_adds not in GROUP_ADDS:
        raise BadContactRequest(f"group_adds: expected one of {', '.join(GROUP_ADDS)}")
    values = {
        key: value
        for key, value in (("message_policy", messages), ("group_adds", group_adds))
        if value is not None
    }
    if values:
        connection.execute(update(users).where(users.c.name == user).values(**values))
    return settings_txn(connection, user, defaults)


ChangeTxn = Callable[[Connection, str, str, str, float], Change]
"""``(connection, actor, owner, other, now)``: one of the changes above."""


def act_txn(
    connection: Connection,
    change: ChangeTxn,
    actor: str,
    device: str | None,
    other: str,
    now: float,
) -> Change:
    """``change`` made by ``actor`` for itself, or for a device it actively guards."""
    return change(connection, actor, owner_txn(connection, actor, device), other, now)
