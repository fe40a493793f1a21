"""Push registrations: a device's token at one provider, one per (user, device).

Every way in (the logic service's ``/devices/me/push``, PUSH_R on the IM connection,
cimctl) goes through ``Registrations``, which validates the same way, writes the
operation log the same way (``push.registered``, ``push.removed``, ``push.token_dead``;
the token itself never: it is a secret that would let anyone push to the device) and
reads the same table. The device is always the caller's own session's device.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cim.json_convention import iso_time
from cim.logic.errors import BadInput, Forbidden, NotFound
from cim.oplog import OperationLog
from cim.storage.database import Database
from cim.storage.push import (
    PushRegistration,
    registrations_of_txn,
    registrations_of_users_txn,
    remove_dead_token_txn,
    remove_registration_txn,
    set_registration_txn,
)
from cim.storage.schema import PUSH_APP_MAX, PUSH_PROVIDER_NAMES, PUSH_TOKEN_MAX

__all__ = [
    "REGISTERED",
    "REMOVED",
    "TOKEN_DEAD",
    "PushRegistration",
    "Registrations",
    "registration_json",
    "registration_problem",
]

REGISTERED = "push.registered"
REMOVED = "push.removed"
TOKEN_DEAD = "push.token_dead"

_TOKEN_PATTERNS = {
    # APNs device tokens are hex (32 bytes today; Apple says not to assume the length).
    "apns": re.compile(r"[0-9A-Fa-f]{32,200}"),
    # FCM registration tokens: base64url and ':' (about 160 characters today).
    "fcm": re.compile(rf"[A-Za-z0-9_:\-]{{16,{PUSH_TOKEN_MAX}}}"),
    # A webhook's tokens are the operator's: any printable ASCII without spaces.
    "webhook": re.compile(rf"[!-~]{{1,{PUSH_TOKEN_MAX}}}"),
}
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,3}")
_APP = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._\-]{{0,{PUSH_APP_MAX - 1}}}")


def registration_problem(
    provider: str, token: str, app: str | None, locale: str | None
) -> str | None:
    """Why a registration is refused, or None. Providers and token shapes as
    documented by each provider; the locale as a BCP 47 tag (``zh-Hans-CN``)."""
    if provider not in PUSH_PROVIDER_NAMES:
        return f"provider must be one of: {', '.join(PUSH_PROVIDER_NAMES)}"
    if not _TOKEN_PATTERNS[provider].fullmatch(token):
        return f"token is not a {provider} token"
    if app is not None and not _APP.fullmatch(app):
        return "app is an application id such as com.example.watch (letters, digits, . _ -)"
    if locale is not None and not _LOCALE.fullmatch(locale):
        return "locale is a language tag such as en, en-GB or zh-Hans-CN"
    return None


def registration_json(registration: PushRegistration) -> dict[str, Any]:
    """What a device is told of its own registration (its token included: it is its own)."""
    body: dict[str, Any] = {
        "device": registration.device,
        "provider": registration.provider,
        "token": registration.token,
        "created_at": iso_time(registration.created_at),
        "updated_at": iso_time(registration.updated_at),
    }
    if registration.app is not None:
        body["app"] = registration.app
    if registration.locale is not None:
        body["locale"] = registration.locale
    return body


class Registrations:
    """Registers, replaces, removes and reads push registrations.

    ``providers`` are the ones this node can push through ([push]); a registration
    with another is refused at once rather than stored and never used.

    The decisions ask ``of_users`` for every entry's receivers, so the answers are
    remembered for ``cache_ttl`` seconds (at most ``cache_size`` users, the least
    recently asked forgotten first): most users have no registration, and a message
    must not cost a database read to learn that again. A change made through this
    node is seen at once; one made through another node within ``cache_ttl``.
    """

    def __init__(
        self,
        database: Database,
        clock: IReactorTime,
        enabled: bool,
        providers: Sequence[str],
        oplog: OperationLog | None = None,
        cache_ttl: float = 10.0,
        cache_size: int = 100_000,
    ) -> None:
        self._database = database
        self._clock = clock
        self.enabled = enabled
        self.providers = tuple(providers)
        self._oplog = oplog
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, list[PushRegistration]]] = OrderedDict()
        self.reads = 0
        """Database reads ``of_users`` made (the cache's misses)."""

    def _emit(self, event: str, user: str, peer: Any = None, **detail: Any) -> None:
        if self._oplog is not None:
            self._oplog.emit(event, user=user, peer=peer, **detail)

    async def register(
        self,
        user: str,
        device: str,
        provider: str,
        token: str,
        app: str | None = None,
        locale: str | None = None,
        peer: Any = None,
    ) -> PushRegistration:
        """Register or replace the device's registration."""
        if not self.enabled:
            raise Forbidden("push_disabled", "push is not enabled on this server")
        if not device:
            raise BadInput("no_device", "the session names no device")
        problem = registration_problem(provider, token, app, locale)
        if problem is not None:
            raise BadInput("bad_registration", problem)
        if provider not in self.providers:
            raise BadInput(
                "provider_unavailable",
                f"this server pushes through: {', '.join(self.providers)}",
            )
        now = float(self._clock.seconds())
        stored = await self._database.run(
            set_registration_txn, user, device, provider, token, app, locale, now
        )
        if stored is None:
            raise NotFound("no_such_user", "the account does not exist")
        self._cache.pop(user, None)
        self._emit(REGISTERED, user, peer, device=device, provider=provider, app=app)
        return stored

    async def remove(
        self, user: str, device: str, peer: Any = None, reason: str | None = None
    ) -> bool:
        """Remove the device's registration; False when it had none. ``reason`` (the
        operation log's): ``logout`` when the device signed out."""
        removed: bool = await self._database.run(remove_registration_txn, user, device)
        self._cache.pop(user, None)
        if removed:
            detail = {"reason": reason} if reason else {}
            self._emit(REMOVED, user, peer, device=device, **detail)
        return removed

    async def signed_out(self, user: str, device: str, peer: Any = None) -> None:
        """The device logged out (the router's ``signed_out``): its registration ends,
        so an account no longer signed in on the phone does not wake it."""
        await self.remove(user, device, peer, reason="logout")

    async def of_device(self, user: str, device: str) -> PushRegistration | None:
        for registration in await self.of_user(user):
            if registration.device == device:
                return registration
        return None

    def of_user(self, user: str) -> Deferred[list[PushRegistration]]:
        return self._database.run(registrations_of_txn, user)

    def known_unregistered(self, user: str) -> bool:
        """Whether the cache says, freshly, that ``user`` has no registration (no
        Deferred, no read: what the decisions ask first of every 1:1 receiver)."""
        cached = self._cache.get(user)
        return (
            cached is not None
            and not cached[1]
            and float(self._clock.seconds()) - cached[0] < self._cache_ttl
        )

    def of_users(self, users: Sequence[str]) -> Deferred[list[PushRegistration]]:
        """The registrations of these users, from the cache where it is fresh."""
        return Deferred.fromCoroutine(self._of_users(list(users)))

    async def _of_users(self, users: list[str]) -> list[PushRegistration]:
        now = float(self._clock.seconds())
        found: list[PushRegistration] = []
        missing: list[str] = []
        for user in users:
            cached = self._cache.get(user)
            if cached is not None and now - cached[0] < self._cache_ttl:
                self._cache.move_to_end(user)
                found.extend(cached[1])
            else:
                missing.append(user)
        if missing:
            self.reads += 1
            read: list[PushRegistration] = await self._database.run(
                registrations_of_users_txn, missing
            )
            by_user: dict[str, list[PushRegistration]] = {user: [] for user in missing}
            for registration in read:
                by_user.setdefault(registration.user, []).append(registration)
            for user, registrations in by_user.items():
                self._cache[user] = (now, registrations)
                self._cache.move_to_end(user)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            found.extend(read)
        return found

    async def token_dead(self, registration: PushRegistration, answer: str) -> bool:
        """The provider said the token is dead: remove it, unless replaced meanwhile."""
        removed: bool = await self._database.run(
            remove_dead_token_txn, registration.user, registration.device, registration.token
        )
        self._cache.pop(registration.user, None)
        if removed:
            self._emit(
                TOKEN_DEAD,
                registration.user,
                device=registration.device,
                provider=registration.provider,
                answer=answer,
            )
        return removed
