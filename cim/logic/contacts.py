"""Contacts, blocks and privacy settings: who may reach whom (docs/privacy.md).

One ``ContactBook`` per node serves every way in: the IM connection (CONTACTS_R, and
the message, invitation and presence checks through ``cim.im.contacts``) and the
logic service's HTTP API (``cim.logic.http.contacts``). The rules themselves live in
``cim.storage.contacts``, decided inside the transactions that read the rows; this
module checks names, runs the transactions, tells people with system notices, and
keeps the message path's answers (``cim.logic.contacts_cache``) right: every change
made here drops the remembered answers of the accounts it touched.

A refusal is a ``LogicError`` with the storage's code. ``not_accepted`` is the one
answer for a name without an account and for an account that does not accept this
from the caller (its policy, a block): nothing tells the two apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cim.accounts.store import USER_NAME
from cim.logic.contacts_cache import DEFAULT_DECISION_CACHE_SIZE, Decisions
from cim.logic.errors import BadInput, Conflict, Forbidden, LogicError, NotFound
from cim.storage.contact_changes import (
    Change,
    ChangeTxn,
    accept_txn,
    act_txn,
    block_txn,
    decline_txn,
    remove_txn,
    request_txn,
    set_settings_txn,
    unblock_txn,
)
from cim.storage.contacts import (
    BadContactRequest,
    ContactConflict,
    ContactError,
    ContactForbidden,
    ContactList,
    ContactNotFound,
    NotAccepted,
    PrivacyDefaults,
    Settings,
    circle_txn,
    contact_list_txn,
    may_message,
    not_accepted_reason,
    owner_txn,
    settings_txn,
    standings_txn,
)
from cim.storage.database import Database

__all__ = ["DEFAULT_DECISION_TTL", "Announcer", "ContactBook", "Silent", "logic_error"]

T = TypeVar("T")

DEFAULT_DECISION_TTL = 10.0
"""Seconds a remembered answer holds on a node alone: only changes made outside the
node's own ContactBook (an account made with cimctl) wait this long to be seen."""

_ERRORS: tuple[tuple[type[ContactError], type[LogicError]], ...] = (
    (NotAccepted, Forbidden),
    (ContactForbidden, Forbidden),
    (ContactNotFound, NotFound),
    (ContactConflict, Conflict),
    (BadContactRequest, BadInput),
)


def logic_error(error: ContactError) -> LogicError:
    """The storage's refusal as the logic service's (same code, same message)."""
    for kind, logic_kind in _ERRORS:
        if isinstance(error, kind):
            return logic_kind(error.code, error.message)
    return BadInput(error.code, error.message)


def _receiver_key(receiver: str) -> str:
    """What a decision is remembered under: a name no account can have (any length a
    frame allows) is one key, "", so made-up names cannot fill the node's memory; it
    is still answered by the same one read as any other refusal."""
    return receiver if USER_NAME.fullmatch(receiver) is not None else ""


class Announcer(Protocol):
    """How the book tells people (``cim.logic.notices.Notices``)."""

    async def send(
        self, receivers: Iterable[str], event: str, urgent: bool = False, **fields: Any
    ) -> list[str]: ...


class Silent:
    """Tells nobody: a book not (yet) given the node's notices."""

    async def send(
        self, receivers: Iterable[str], event: str, urgent: bool = False, **fields: Any
    ) -> list[str]:
        return []


class ContactBook:
    """Every contact operation, and the message path's cached decision.

    ``notices`` is given by the daemon once the IM node that stores system messages
    exists (the node itself needs the book first).
    """

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        defaults: PrivacyDefaults,
        cache_ttl: float | None = DEFAULT_DECISION_TTL,
        cache_size: int = DEFAULT_DECISION_CACHE_SIZE,
    ) -> None:
        self._db = db
        self._clock = clock
        self.defaults = defaults
        self.notices: Announcer = Silent()
        self.decisions = Decisions(clock, self._read_decision, cache_ttl, cache_size)

    # --- the message path -----------------------------------------------------------------

    def known(self, sender: str, receiver: str) -> bool | None:
        """The remembered answer to ``may_message``, or None when it must be read."""
        return self.decisions.known(sender, _receiver_key(receiver))

    def may_message(self, sender: str, receiver: str) -> Deferred[bool]:
        """Whether ``sender`` may send ``receiver`` a 1:1 message; False for a name
        without an account, after the same one read as for any other refusal."""
        return self.decisions.decide(sender, _receiver_key(receiver))

    def _read_decision(self, sender: str, receiver: str) -> Deferred[bool]:
        d = self._db.run(standings_txn, sender, [receiver])
        return d.addCallback(lambda found: may_message(found.get(receiver), self.defaults))

    def circle(self, user: str) -> Deferred[list[str]]:
        """Whose presence ``user`` may see: its contacts and its bound accounts."""
        return self._db.run(circle_txn, user)

    def forget(self, *users: str) -> None:
        """Drop the remembered answers about these accounts (their rows changed)."""
        for user in users:
            self.decisions.forget(user)

    # --- reads --------------------------------------------------------------------------

    async def contact_list(self, actor: str, device: str | None = None) -> ContactList:
        """The caller's book (with the requests waiting for its devices), or a device's."""
        self._check_device(device)

        def read(connection: Any) -> ContactList:
            owner = owner_txn(connection, actor, device)
            return contact_list_txn(connection, owner, self.defaults, guarded=owner == actor)

        return await self._refusing(lambda: self._db.run(read))

    async def settings(self, user: str) -> Settings:
        return await self._refusing(lambda: self._db.run(settings_txn, user, self.defaults))

    # --- changes ------------------------------------------------------------------------

    async def change_settings(
        self,
        user: str,
        messages: str | None = None,
        group_adds: str | None = None,
        read_receipts: str | None = None,
    ) -> Settings:
        settings = await self._refusing(
            lambda: self._db.run(
                set_settings_txn, user, messages, group_adds, self.defaults, read_receipts
            )
        )
        self.forget(user)
        return settings

    async def request(self, actor: str, target: str, device: str | None = None) -> str:
        """``requested``, or ``accepted`` when the target had asked first (or already is
        a contact). A name without an account is refused as ``not_accepted``."""
        if USER_NAME.fullmatch(target) is None:
            raise Forbidden(NotAccepted.code, not_accepted_reason(target))
        return await self._change(request_txn, actor, target, device)

    async def accept(self, actor: str, requester: str, device: str | None = None) -> str:
        return await self._change(accept_txn, actor, self._name(requester), device)

    async def decline(self, actor: str, requester: str, device: str | None = None) -> str:
        return await self._change(decline_txn, actor, self._name(requester), device)

    async def remove(self, actor: str, other: str, device: str | None = None) -> str:
        return await self._change(remove_txn, actor, self._name(other), device)

    async def block(self, actor: str, other: str, device: str | None = None) -> str:
        return await self._change(block_txn, actor, self._name(other), device)

    async def unblock(self, actor: str, other: str, device: str | None = None) -> str:
        return await self._change(unblock_txn, actor, self._name(other), device)

    async def _change(self, change: ChangeTxn, actor: str, other: str, device: str | None) -> str:
        self._check_device(device)
        now = float(self._clock.seconds())
        done: Change = await self._refusing(
            lambda: self._db.run(act_txn, change, actor, device, other, now)
        )
        self.forget(*done.touched)
        await self._tell(done)
        return done.status

    async def _tell(self, done: Change) -> None:
        by_notice: dict[tuple[tuple[str, str], ...], list[str]] = {}
        for receiver, notice in done.told.items():
            by_notice.setdefault(tuple(sorted(notice.items())), []).append(receiver)
        for items, receivers in by_notice.items():
            fields: dict[str, Any] = dict(items)
            event = fields.pop("event")
            await self.notices.send(receivers, event, False, **fields)

    # --- checks -------------------------------------------------------------------------

    @staticmethod
    def _name(name: str) -> str:
        if USER_NAME.fullmatch(name) is None:
            raise BadInput("bad_request", f"not a user name: {name[:80]!r}")
        return name

    def _check_device(self, device: str | None) -> None:
        if device is not None:
            self._name(device)

    @staticmethod
    async def _refusing(work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except ContactError as error:
            raise logic_error(error) from None
