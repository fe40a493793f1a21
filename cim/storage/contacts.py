"""Transactions on contacts, contact requests, blocks and privacy settings.

Who may reach whom is decided here, against the rows the same transaction reads, so
the IM node's message check, the group directory's invitations and the contact
requests all follow one rule (docs/privacy.md):

- a *person* takes 1:1 messages from everyone (policy ``everyone``) or only from
  contacts (``contacts``); contact requests and group invitations from anyone the
  policy lets message them;
- a *device* (a child's watch) talks only with its active guardians and the contacts
  they approved for it, whatever anyone's policy; its guardians answer its requests;
- a *block* refuses everything from the blocked account, and the blocked account is
  told exactly what it would be told about a name without an account.

A contact is two rows, one per side. A device's side is given by one of its active
guardians, a person's by the person: a request holds the requesting side's consent,
and accepting it adds the other side's. This module holds the rules and the reads;
``cim.storage.contact_changes`` the changes. Inputs are well-formed names (the caller
checks them); refusals are ``ContactError`` subclasses, raised before anything is
written, so the transaction changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import Table, and_, exists, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from cim.storage.bindings import ACTIVE, account_kind_txn, active_guardians_txn
from cim.storage.schema import (
    GROUP_ADDS,
    MESSAGE_POLICIES,
    bindings,
    blocks,
    contact_requests,
    contacts,
    users,
)

__all__ = [
    "ADD",
    "CONTACTS",
    "DEVICE",
    "EVERYONE",
    "GUARDIANS",
    "INVITE",
    "NOBODY",
    "BadContactRequest",
    "ContactConflict",
    "ContactError",
    "ContactForbidden",
    "ContactList",
    "ContactNotFound",
    "ContactRecord",
    "NotAccepted",
    "PendingRecord",
    "PrivacyDefaults",
    "Settings",
    "Standing",
    "admission",
    "circle_txn",
    "contact_list_txn",
    "deciders_txn",
    "insert_missing",
    "may_message",
    "not_accepted_reason",
    "owner_txn",
    "settings_txn",
    "standings_txn",
]

EVERYONE = "everyone"
CONTACTS = "contacts"
NOBODY = "nobody"
GUARDIANS = "guardians"
"""A device's ``group_adds`` as reported: only its guardians add it, never by invitation."""
DEVICE = "device"


# --- refusals -------------------------------------------------------------------------


class ContactError(Exception):
    """A refused contact operation: ``code`` for programs, ``message`` for people."""

    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotAccepted(ContactError):
    """No such account, or it does not accept this from you: the two are one answer."""

    code = "not_accepted"


class ContactForbidden(ContactError):
    code = "forbidden"


class ContactNotFound(ContactError):
    code = "not_found"


class ContactConflict(ContactError):
    code = "conflict"


class BadContactRequest(ContactError):
    code = "bad_request"


# --- the rule -------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyDefaults:
    """What an account that never chose follows ([im] default_message_policy, ...)."""

    messages: str = EVERYONE
    group_adds: str = CONTACTS

    def __post_init__(self) -> None:
        if self.messages not in MESSAGE_POLICIES:
            raise ValueError(f"message policy {self.messages!r}: expected {MESSAGE_POLICIES}")
        if self.group_adds not in GROUP_ADDS:
            raise ValueError(f"group_adds {self.group_adds!r}: expected {GROUP_ADDS}")


@dataclass(frozen=True)
class Standing:
    """Where ``other`` stands towards one account (``of``), as one statement reads it."""

    of: str
    other: str
    other_kind: str | None
    """The other account's kind (``person``, ``device``); None: no such account."""
    kind: str
    messages: str | None
    """The account's own settings as stored (None: the server's default)."""
    group_adds: str | None
    contact: bool
    blocked: bool
    """The account blocked ``other``."""
    family: bool
    """An active binding joins the two (a device and one of its guardians)."""

    def policy(self, defaults: PrivacyDefaults) -> str:
        return self.messages or defaults.messages

    def adds(self, defaults: PrivacyDefaults) -> str:
        return self.group_adds or defaults.group_adds


def standings_txn(
    connection: Connection, other: str, names: Sequence[str], *, lock: bool = False
) -> dict[str, Standing]:
    """How each existing account of ``names`` stands towards ``other``, in ONE statement.

    A name without an account is simply absent, so a caller's answer for it can be
    the answer for a refusal: the same statement ran either way. ``lock`` holds the
    rows read (``FOR KEY SHARE`` on PostgreSQL) until commit, so an account deleted
    meanwhile waits for a transaction that writes rows naming it.
    """
    if not names:
        return {}
    other_kind = select(users.c.kind).where(users.c.name == other).scalar_subquery()
    is_contact = exists().where(contacts.c.user_name == users.c.name, contacts.c.contact == other)
    is_blocked = exists().where(blocks.c.user_name == users.c.name, blocks.c.blocked == other)
    is_family = exists().where(
        bindings.c.status == ACTIVE,
        or_(
            and_(bindings.c.device == users.c.name, bindings.c.guardian == other),
            and_(bindings.c.device == other, bindings.c.guardian == users.c.name),
        ),
    )
    statement = select(
        users.c.name,
        users.c.kind,
        users.c.message_policy,
        users.c.group_adds,
        other_kind.label("other_kind"),
        is_contact.label("contact"),
        is_blocked.label("blocked"),
        is_family.label("family"),
    ).where(users.c.name.in_(list(names)))
    if lock:
        statement = statement.with_for_update(read=True, key_share=True, of=users)
    return {
        row.name: Standing(
            of=row.name,
            other=other,
            other_kind=None if row.other_kind is None else str(row.other_kind),
            kind=str(row.kind),
            messages=row.message_policy,
            group_adds=row.group_adds,
            contact=bool(row.contact),
            blocked=bool(row.blocked),
            family=bool(row.family),
        )
        for row in connection.execute(statement)
    }


def may_message(standing: Standing | None, defaults: PrivacyDefaults) -> bool:
    """Whether ``standing.other`` may send a 1:1 message to ``standing.of``.

    None (no such account) and a block refuse; a binding or a contact admits; a device
    on either side admits nobody else; otherwise the receiver's policy decides.
    """
    if standing is None or standing.other_kind is None or standing.blocked:
        return False
    if standing.of == standing.other or standing.family or standing.contact:
        return True
    if standing.kind == DEVICE or standing.other_kind == DEVICE:
        return False
    return standing.policy(defaults) == EVERYONE


ADD = "add"
INVITE = "invite"


def admission(standing: Standing | None, defaults: PrivacyDefaults) -> str | None:
    """How ``standing.other`` may bring ``standing.of`` into a group: ``add`` at once,
    ``invite`` (it joins when it accepts), or not at all (None).

    A device only by one of its guardians, at once. A person: at once by a contact
    when its ``group_adds`` is ``contacts``; else by invitation, from anyone its
    message policy lets reach it. A block or a name without an account: not at all.
    """
    if standing is None or standing.other_kind is None or standing.blocked:
        return None
    if standing.kind == DEVICE:
        return ADD if standing.family else None
    if standing.contact or standing.family:
        return ADD if standing.adds(defaults) == CONTACTS else INVITE
    return INVITE if standing.policy(defaults) == EVERYONE else None


# --- acting for an account ------------------------------------------------------------


def owner_txn(connection: Connection, actor: str, device: str | None) -> str:
    """Whose contacts ``actor`` changes: its own, or a device's it actively guards."""
    if device is None or device == actor:
        return actor
    guards = connection.execute(
        select(bindings.c.device)
        .join(users, users.c.name == bindings.c.device)
        .where(
            bindings.c.device == device,
            bindings.c.guardian == actor,
            bindings.c.status == ACTIVE,
            users.c.kind == DEVICE,
        )
    ).first()
    if guards is None:
        raise ContactForbidden(f"you are not an active guardian of a device named {device!r}")
    return device


def deciders_txn(connection: Connection, name: str) -> list[str]:
    """Who answers for an account: the person, or a device's active guardians."""
    if account_kind_txn(connection, name) == DEVICE:
        return active_guardians_txn(connection, name)
    return [name]


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class ContactRecord:
    user: str
    since: float
    approved_by: str | None


@dataclass(frozen=True)
class PendingRecord:
    user: str
    """The other side of the request."""
    at: float
    requested_by: str
    device: str | None = None
    """For a guardian's list: which of its devices an incoming request is for."""


@dataclass(frozen=True)
class Settings:
    messages: str
    group_adds: str
    read_receipts: str = "on"
    """Whether others see what the account reads (cim.storage.read_marks): on, off."""


@dataclass(frozen=True)
class ContactList:
    contacts: list[ContactRecord]
    incoming: list[PendingRecord]
    outgoing: list[PendingRecord]
    blocked: list[str]
    settings: Settings


# --- reads ----------------------------------------------------------------------------


def settings_txn(connection: Connection, user: str, defaults: PrivacyDefaults) -> Settings:
    row = connection.execute(
        select(
            users.c.kind, users.c.message_policy, users.c.group_adds, users.c.read_receipts
        ).where(users.c.name == user)
    ).first()
    if row is None:
        raise ContactNotFound("no such user")
    receipts = row.read_receipts or "on"
    if row.kind == DEVICE:
        return Settings(CONTACTS, GUARDIANS, receipts)
    return Settings(
        row.message_policy or defaults.messages,
        row.group_adds or defaults.group_adds,
        receipts,
    )


def contact_list_txn(
    connection: Connection, owner: str, defaults: PrivacyDefaults, *, guarded: bool
) -> ContactList:
    """The owner's contacts, requests both ways, blocks and settings; ``guarded`` adds
    the requests waiting for the devices the owner actively guards."""
    settings = settings_txn(connection, owner, defaults)
    rows = connection.execute(
        select(contacts.c.contact, contacts.c.created_at, contacts.c.approved_by)
        .where(contacts.c.user_name == owner)
        .order_by(contacts.c.contact)
    )
    found = [ContactRecord(r.contact, float(r.created_at), r.approved_by) for r in rows]
    incoming = [
        PendingRecord(r.requester, float(r.created_at), r.requested_by)
        for r in connection.execute(
            select(contact_requests)
            .where(contact_requests.c.target == owner)
            .order_by(contact_requests.c.created_at, contact_requests.c.requester)
        )
    ]
    if guarded:
        devices = (
            select(bindings.c.device)
            .join(users, users.c.name == bindings.c.device)
            .where(
                bindings.c.guardian == owner,
                bindings.c.status == ACTIVE,
                users.c.kind == DEVICE,
            )
        )
        incoming += [
            PendingRecord(r.requester, float(r.created_at), r.requested_by, r.target)
            for r in connection.execute(
                select(contact_requests)
                .where(contact_requests.c.target.in_(devices))
                .order_by(contact_requests.c.created_at, contact_requests.c.requester)
            )
        ]
    outgoing = [
        PendingRecord(r.target, float(r.created_at), r.requested_by)
        for r in connection.execute(
            select(contact_requests)
            .where(contact_requests.c.requester == owner)
            .order_by(contact_requests.c.created_at, contact_requests.c.target)
        )
    ]
    blocked = list(
        connection.execute(
            select(blocks.c.blocked).where(blocks.c.user_name == owner).order_by(blocks.c.blocked)
        ).scalars()
    )
    return ContactList(found, incoming, outgoing, blocked, settings)


def circle_txn(connection: Connection, user: str) -> list[str]:
    """Whose presence ``user`` may see: its contacts and the accounts bound to it."""
    names = set(
        connection.execute(select(contacts.c.contact).where(contacts.c.user_name == user)).scalars()
    )
    for row in connection.execute(
        select(bindings.c.device, bindings.c.guardian).where(
            bindings.c.status == ACTIVE,
            or_(bindings.c.device == user, bindings.c.guardian == user),
        )
    ):
        names.add(row.guardian if row.device == user else row.device)
    names.discard(user)
    return sorted(names)


def insert_missing(connection: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert the rows whose key is not there yet; how many were. A concurrent
    transaction that inserted the same key first makes this one a no-op, not an error
    (``ON CONFLICT DO NOTHING`` on both engines)."""
    if not rows:
        return 0
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    result = connection.execute(dialect.insert(table).on_conflict_do_nothing(), list(rows))
    return int(result.rowcount or 0)


def not_accepted_reason(name: str) -> str:
    """The one refusal for a name without an account and for an account that says no."""
    return f"not accepted: {name!r} does not exist or does not accept this from you"
