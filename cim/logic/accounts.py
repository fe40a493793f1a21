"""Accounts: registration, profiles, password change, deleting an account.

A password change ends the sessions of the user's other devices, as a deletion ends
them all: whoever holds a token or resumption ticket from before (a lost phone, a
stolen token) is logged out with the old password. The device that changed it stays.

The rules come from two places: ``[accounts]`` (the password length and the KDF cost,
shared with cimctl) and ``[logic]`` (what open registration accepts: a name pattern
and a mix of character classes). Every call that proves a password runs the KDF on
the accounts' own pool and is throttled per user, like the router's login.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from twisted.logger import Logger

from cim.accounts.store import (
    USER_NAME,
    InvalidUserName,
    NoSuchUser,
    ReservedUserName,
    UserExists,
    WeakPassword,
    is_reserved_name,
)
from cim.backends.state import REASON_PASSWORD_CHANGED
from cim.interfaces import StateUnavailable
from cim.logic.context import LogicContext
from cim.logic.errors import BadInput, Conflict, Forbidden, NotFound, TooManyAttempts
from cim.storage.profiles import Profile, delete_account_txn, profile_txn, update_profile_txn
from cim.throttle import FailedLoginThrottle

__all__ = ["REASON_ACCOUNT_DELETED", "Accounts", "password_classes"]

REASON_ACCOUNT_DELETED = "account deleted"
_CLASSES = (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^a-zA-Z0-9]")


def password_classes(password: str) -> int:
    """How many of lower case, upper case, digits and other characters it mixes."""
    return sum(1 for pattern in _CLASSES if re.search(pattern, password))


class Accounts:
    log = Logger()

    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx
        config = ctx.config
        self._name_rule = re.compile(config.name_pattern)
        self._registrations = FailedLoginThrottle(
            ctx.clock, config.registrations_per_address, config.registration_window
        )
        self._password_failures = FailedLoginThrottle(ctx.clock, 5, 300.0)

    # --- registration -------------------------------------------------------------------

    async def register(
        self, name: str, password: str, kind: str, display_name: str | None, address: str
    ) -> Profile:
        """Open registration, throttled per ``address``: every attempt counts."""
        if not self.ctx.config.open_registration:
            raise Forbidden("registration_closed", "open registration is switched off")
        if is_reserved_name(name, self.ctx.accounts_config):
            raise BadInput("reserved_name", "that name is reserved")
        if USER_NAME.fullmatch(name) is None or self._name_rule.fullmatch(name) is None:
            raise BadInput(
                "invalid_name",
                f"the name must match {self.ctx.config.name_pattern!r} "
                "(letters, digits, '.', '_' or '-', starting with a letter or digit)",
            )
        self._check_password_rules(password)
        wait = self._registrations.blocked(address)
        if wait:
            raise TooManyAttempts(
                "too_many_registrations", "too many registrations from this address", wait
            )
        self._registrations.record_failure(address)
        try:
            await self.ctx.accounts.add_user(name, password, kind)
        except UserExists:
            raise Conflict("name_taken", "that name is taken") from None
        except ReservedUserName:
            raise BadInput("reserved_name", "that name is reserved") from None
        except InvalidUserName:
            raise BadInput("invalid_name", "that name is not allowed") from None
        except WeakPassword as exc:
            raise BadInput("weak_password", str(exc)) from None
        # Messages to the name were refused until now, and may be remembered so.
        self.ctx.contacts.forget(name)
        if display_name:
            await self.ctx.database.run(
                update_profile_txn, name, {"display_name": display_name}, self.ctx.now()
            )
        return await self.profile(name)

    def _check_password_rules(self, password: str) -> None:
        minimum = self.ctx.accounts_config.min_password_length
        if len(password) < minimum:
            raise BadInput("weak_password", f"the password needs at least {minimum} characters")
        classes = self.ctx.config.password_classes
        if password_classes(password) < classes:
            raise BadInput(
                "weak_password",
                f"the password must mix at least {classes} of: lower case, upper case, "
                "digits, other characters",
            )

    # --- profiles -----------------------------------------------------------------------

    async def profile(self, name: str) -> Profile:
        profile = await self.ctx.database.run(profile_txn, name)
        if profile is None:
            raise NotFound("not_found", "no such user")
        return profile

    async def update_profile(self, user: str, changes: Mapping[str, str]) -> Profile:
        avatar = changes.get("avatar_url")
        if avatar and not self.ctx.media_urls.accepts(avatar):
            raise BadInput(
                "bad_request", "body.avatar_url: expected an https URL, or this node's file URL"
            )
        profile = await self.ctx.database.run(
            update_profile_txn, user, dict(changes), self.ctx.now()
        )
        if profile is None:
            raise NotFound("not_found", "no such user")
        return profile

    # --- password and deletion ------------------------------------------------------------

    async def _prove(self, user: str, password: str) -> None:
        """The attempt counts as a failure while the KDF runs, so guesses sent all at
        once cannot each pass ``blocked`` before any of them is recorded."""
        failures = self._password_failures
        wait = failures.blocked(user)
        if wait:
            raise TooManyAttempts("too_many_attempts", "too many wrong passwords", wait)
        failures.record_failure(user)
        try:
            right = await self.ctx.accounts.check_password(user, password)
        except BaseException:
            failures.forgive(user)  # no answer is not a wrong password
            raise
        if not right:
            raise Forbidden("wrong_password", "the password is wrong")
        failures.record_success(user)

    async def change_password(
        self, user: str, current: str, new: str, device: str
    ) -> list[str] | None:
        """The devices logged out (every one of the user's but ``device``), or None
        when the session store could not be reached: the password is changed either
        way, and the other sessions then end when they expire."""
        self._check_password_rules(new)
        await self._prove(user, current)
        try:
            await self.ctx.accounts.set_password(user, new)
        except WeakPassword as exc:
            raise BadInput("weak_password", str(exc)) from None
        except NoSuchUser:
            raise NotFound("not_found", "no such user") from None
        # After the change, so a login racing it needs the new password to survive.
        try:
            ended = await self.ctx.sessions.end_user_sessions(
                user, REASON_PASSWORD_CHANGED, keep_device=device
            )
        except StateUnavailable:
            self.log.warn(
                "session store down: {user}'s other sessions not ended after a password change",
                user=user,
            )
            return None
        return [record.device for record in ended]

    async def delete_account(self, user: str, password: str) -> None:
        """Everything the account owns goes; its session ends; its bindings are told."""
        await self._prove(user, password)
        await self.ctx.settled()
        deleted = await self.ctx.database.run(delete_account_txn, user, self.ctx.now())
        if deleted is None:
            raise NotFound("not_found", "no such user")
        # As when leaving through the directory: fan-out must not keep sending to a
        # deleted member. Other nodes' caches expire after their cache_ttl.
        for left in deleted.left_groups:
            self.ctx.groups.forget(left.group_id)
        # Its contacts, requests, blocks and invitations went with the row (ON DELETE
        # CASCADE); whatever was decided about the name must not outlive them.
        self.ctx.contacts.forget(user)
        try:
            await self.ctx.sessions.end_user_sessions(user, REASON_ACCOUNT_DELETED)
        except StateUnavailable:
            # The account is gone, so its token no longer authenticates anywhere; the
            # connection ends when its session or route expires.
            self.log.warn("session store down: {user}'s sessions not ended at once", user=user)
        await self.ctx.notices.send(
            deleted.told, "binding.removed", account=user, reason="account_deleted"
        )
