"""Accounts over HTTP: registration, profiles, password change, deleting an account.

The rules come from two places: ``[accounts]`` (the password length and the KDF cost,
shared with cimctl) and ``[logic]`` (what open registration accepts: a name pattern
and a mix of character classes). Every call that proves a password runs the KDF on
the accounts' own pool and is throttled per user, like the router's login.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger

from cim.accounts.store import (
    USER_NAME,
    InvalidUserName,
    NoSuchUser,
    UserExists,
    WeakPassword,
)
from cim.http.site import HttpError, too_many_requests
from cim.interfaces import StateUnavailable
from cim.logic.api import Answer, Call, Endpoint, is_media_url, object_schema
from cim.logic.context import LogicContext
from cim.storage.profiles import Profile, delete_account_txn, profile_txn, update_profile_txn
from cim.storage.schema import DISPLAY_NAME_MAX, URL_MAX, USER_KINDS
from cim.throttle import FailedLoginThrottle

__all__ = ["NAME_PARAM", "AccountApi", "password_classes"]

REASON_ACCOUNT_DELETED = "account deleted"
MAX_PASSWORD = 1024
NAME_PARAM = {"type": "string", "pattern": "^" + USER_NAME.pattern + "$"}
_PASSWORD = {"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD, "writeOnly": True}
_PROFILE_FIELDS: dict[str, dict[str, Any]] = {
    "display_name": {"type": "string", "maxLength": DISPLAY_NAME_MAX},
    "avatar_url": {
        "type": "string",
        "maxLength": URL_MAX,
        "pattern": r"^(https?://\S+)?$",
        "description": "an http(s) URL (a file service download URL), or empty",
    },
    "about": {"type": "string", "maxLength": 280},
}
PROFILE_SCHEMA = object_schema(
    {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": list(USER_KINDS)},
        **_PROFILE_FIELDS,
        "created_at": {"type": "number"},
    },
    ["name", "kind", "display_name", "avatar_url", "about", "created_at"],
)
_CLASSES = (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^a-zA-Z0-9]")


def password_classes(password: str) -> int:
    """How many of lower case, upper case, digits and other characters it mixes."""
    return sum(1 for pattern in _CLASSES if re.search(pattern, password))


def profile_json(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "kind": profile.kind,
        "display_name": profile.display_name,
        "avatar_url": profile.avatar_url,
        "about": profile.about,
        "created_at": profile.created_at,
    }


class AccountApi:
    log = Logger()

    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx
        config = ctx.config
        self._name_rule = re.compile(config.name_pattern)
        self._registrations = FailedLoginThrottle(
            ctx.clock, config.registrations_per_address, config.registration_window
        )
        self._password_failures = FailedLoginThrottle(ctx.clock, 5, 300.0)

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                "POST",
                "/register",
                "register",
                "Create an account (when open registration is on)",
                "accounts",
                self.register,
                body=object_schema(
                    {
                        "name": {"type": "string", "minLength": 1, "maxLength": 64},
                        "password": _PASSWORD,
                        "kind": {"type": "string", "enum": list(USER_KINDS)},
                        "display_name": _PROFILE_FIELDS["display_name"],
                    },
                    ["name", "password"],
                ),
                response=PROFILE_SCHEMA,
                status=201,
                authenticated=False,
                errors=(403, 409, 429),
                description=(
                    "`kind` is `person` (default) or `device` (a watch or tracker, which "
                    "guardians bind to). Log in through the router afterwards."
                ),
            ),
            Endpoint(
                "GET",
                "/me",
                "get_me",
                "The caller's own profile",
                "accounts",
                self.get_me,
                response=PROFILE_SCHEMA,
            ),
            Endpoint(
                "PATCH",
                "/me",
                "update_me",
                "Change the caller's profile fields",
                "accounts",
                self.update_me,
                body={**object_schema(_PROFILE_FIELDS), "minProperties": 1},
                response=PROFILE_SCHEMA,
            ),
            Endpoint(
                "GET",
                "/users/{name}",
                "get_user",
                "Another account's public profile",
                "accounts",
                self.get_user,
                params={"name": NAME_PARAM},
                response=PROFILE_SCHEMA,
            ),
            Endpoint(
                "POST",
                "/me/password",
                "change_password",
                "Change the caller's password (the current one proves it is them)",
                "accounts",
                self.change_password,
                body=object_schema(
                    {"current_password": _PASSWORD, "new_password": _PASSWORD},
                    ["current_password", "new_password"],
                ),
                response=object_schema({"ok": {"type": "boolean"}}, ["ok"]),
                errors=(403, 429),
            ),
            Endpoint(
                "DELETE",
                "/me",
                "delete_me",
                "Delete the caller's account and everything it owns; its session ends",
                "accounts",
                self.delete_me,
                body=object_schema({"password": _PASSWORD}, ["password"]),
                response=object_schema({"deleted": {"type": "string"}}, ["deleted"]),
                errors=(403, 429),
            ),
        ]

    # --- registration -------------------------------------------------------------------

    async def register(self, call: Call) -> Answer:
        if not self.ctx.config.open_registration:
            raise HttpError(403, "registration_closed", "open registration is switched off")
        name = str(call.body["name"])
        password = str(call.body["password"])
        kind = str(call.body.get("kind", "person"))
        if USER_NAME.fullmatch(name) is None or self._name_rule.fullmatch(name) is None:
            raise HttpError(
                400,
                "invalid_name",
                f"the name must match {self.ctx.config.name_pattern!r} "
                "(letters, digits, '.', '_' or '-', starting with a letter or digit)",
            )
        self._check_password_rules(password)
        wait = self._registrations.blocked(call.address)
        if wait:
            raise too_many_requests(
                "too_many_registrations", "too many registrations from this address", wait
            )
        self._registrations.record_failure(call.address)
        try:
            await self.ctx.accounts.add_user(name, password, kind)
        except UserExists:
            raise HttpError(409, "name_taken", "that name is taken") from None
        except InvalidUserName:
            raise HttpError(400, "invalid_name", "that name is not allowed") from None
        except WeakPassword as exc:
            raise HttpError(400, "weak_password", str(exc)) from None
        display_name = call.body.get("display_name")
        if display_name:
            await self.ctx.database.run(
                update_profile_txn, name, {"display_name": str(display_name)}, self.ctx.now()
            )
        return 201, profile_json(await self._profile(name))

    def _check_password_rules(self, password: str) -> None:
        minimum = self.ctx.accounts_config.min_password_length
        if len(password) < minimum:
            raise HttpError(
                400, "weak_password", f"the password needs at least {minimum} characters"
            )
        classes = self.ctx.config.password_classes
        if password_classes(password) < classes:
            raise HttpError(
                400,
                "weak_password",
                f"the password must mix at least {classes} of: lower case, upper case, "
                "digits, other characters",
            )

    # --- profiles -----------------------------------------------------------------------

    async def _profile(self, name: str) -> Profile:
        profile = await self.ctx.database.run(profile_txn, name)
        if profile is None:
            raise HttpError(404, "not_found", "no such user")
        return profile

    async def get_me(self, call: Call) -> Answer:
        return 200, profile_json(await self._profile(call.user.user))

    async def update_me(self, call: Call) -> Answer:
        changes = {key: str(value) for key, value in call.body.items()}
        avatar = changes.get("avatar_url")
        if avatar and not is_media_url(avatar):
            raise HttpError(400, "bad_request", "body.avatar_url: expected an http(s) URL")
        profile = await self.ctx.database.run(
            update_profile_txn, call.user.user, changes, self.ctx.now()
        )
        if profile is None:
            raise HttpError(404, "not_found", "no such user")
        return 200, profile_json(profile)

    async def get_user(self, call: Call) -> Answer:
        return 200, profile_json(await self._profile(str(call.params["name"])))

    # --- password and deletion ------------------------------------------------------------

    async def _prove(self, user: str, password: str) -> None:
        """The attempt counts as a failure while the KDF runs, so guesses sent all at
        once cannot each pass ``blocked`` before any of them is recorded."""
        failures = self._password_failures
        wait = failures.blocked(user)
        if wait:
            raise too_many_requests("too_many_attempts", "too many wrong passwords", wait)
        failures.record_failure(user)
        try:
            right = await self.ctx.accounts.check_password(user, password)
        except BaseException:
            failures.forgive(user)  # no answer is not a wrong password
            raise
        if not right:
            raise HttpError(403, "wrong_password", "the password is wrong")
        failures.record_success(user)

    async def change_password(self, call: Call) -> Answer:
        user = call.user.user
        new = str(call.body["new_password"])
        self._check_password_rules(new)
        await self._prove(user, str(call.body["current_password"]))
        try:
            await self.ctx.accounts.set_password(user, new)
        except WeakPassword as exc:
            raise HttpError(400, "weak_password", str(exc)) from None
        except NoSuchUser:
            raise HttpError(404, "not_found", "no such user") from None
        return 200, {"ok": True}

    async def delete_me(self, call: Call) -> Answer:
        user = call.user.user
        await self._prove(user, str(call.body["password"]))
        deleted = await self.ctx.database.run(delete_account_txn, user, self.ctx.now())
        if deleted is None:
            raise HttpError(404, "not_found", "no such user")
        if self.ctx.groups is not None:
            # As when leaving through the directory: fan-out must not keep sending to a
            # deleted member. Other nodes' caches expire after their cache_ttl.
            for left in deleted.left_groups:
                self.ctx.groups.forget(left.group_id)
        try:
            await self.ctx.state.sessions.end_user_session(user, REASON_ACCOUNT_DELETED)
        except StateUnavailable:
            # The account is gone, so its token no longer authenticates anywhere; the
            # connection ends when its session or route expires.
            self.log.warn("session store down: {user}'s session not ended at once", user=user)
        await self.ctx.notices.send(
            deleted.told, "binding.removed", account=user, reason="account_deleted"
        )
        return 200, {"deleted": user}
