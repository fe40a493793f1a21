"""Accounts over HTTP: register, read and change profiles, change the password, delete."""

from __future__ import annotations

from typing import Any

from cim.accounts.store import USER_NAME
from cim.http.schema import TIMESTAMP, object_schema
from cim.http.site import Reply
from cim.json_convention import iso_time, present
from cim.logic.accounts import Accounts
from cim.logic.http.api import LogicCall, LogicEndpoint, answer
from cim.storage.profiles import Profile
from cim.storage.schema import DISPLAY_NAME_MAX, URL_MAX, USER_KINDS

__all__ = ["NAME_PARAM", "account_endpoints", "profile_json"]

MAX_PASSWORD = 1024
NAME_PARAM = {"type": "string", "pattern": "^" + USER_NAME.pattern + "$"}
_PASSWORD = {"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD, "writeOnly": True}
_PROFILE_FIELDS: dict[str, dict[str, Any]] = {
    "display_name": {"type": "string", "maxLength": DISPLAY_NAME_MAX},
    "avatar_url": {
        "type": "string",
        "maxLength": URL_MAX,
        "pattern": r"^(https?://\S+)?$",
        "description": "an https URL, or a URL of this node's file service, or empty",
    },
    "about": {"type": "string", "maxLength": 280},
}
PROFILE_SCHEMA = object_schema(
    {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": list(USER_KINDS)},
        "display_name": {"type": "string", "minLength": 1},
        "avatar_url": {"type": "string", "minLength": 1},
        "about": {"type": "string", "minLength": 1},
        "created_at": TIMESTAMP,
    },
    ["name", "kind", "created_at"],
    description="Profile fields that are not set are left out.",
)


def profile_json(profile: Profile) -> dict[str, Any]:
    return present(
        {
            "name": profile.name,
            "kind": profile.kind,
            "display_name": profile.display_name,
            "avatar_url": profile.avatar_url,
            "about": profile.about,
            "created_at": iso_time(profile.created_at),
        }
    )


def account_endpoints(accounts: Accounts) -> list[LogicEndpoint]:
    async def register(call: LogicCall) -> Reply:
        display_name = call.body.get("display_name")
        profile = await accounts.register(
            str(call.body["name"]),
            str(call.body["password"]),
            str(call.body.get("kind", "person")),
            None if display_name is None else str(display_name),
            call.address,
        )
        return answer(201, profile_json(profile))

    async def get_me(call: LogicCall) -> Reply:
        return answer(200, profile_json(await accounts.profile(call.user.user)))

    async def update_me(call: LogicCall) -> Reply:
        changes = {key: str(value) for key, value in call.body.items()}
        return answer(200, profile_json(await accounts.update_profile(call.user.user, changes)))

    async def get_user(call: LogicCall) -> Reply:
        return answer(200, profile_json(await accounts.profile(str(call.params["name"]))))

    async def change_password(call: LogicCall) -> Reply:
        logged_out = await accounts.change_password(
            call.user.user,
            str(call.body["current_password"]),
            str(call.body["new_password"]),
            call.user.device,
        )
        return answer(
            200,
            {
                "ok": True,
                "other_sessions_ended": logged_out is not None,
                "logged_out_devices": logged_out or [],
            },
        )

    async def delete_me(call: LogicCall) -> Reply:
        user = call.user.user
        await accounts.delete_account(user, str(call.body["password"]))
        return answer(200, {"deleted": user})

    return [
        LogicEndpoint(
            "POST",
            "/register",
            "register",
            "Create an account (when open registration is on)",
            "accounts",
            register,
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
        LogicEndpoint(
            "GET",
            "/me",
            "get_me",
            "The caller's own profile",
            "accounts",
            get_me,
            response=PROFILE_SCHEMA,
        ),
        LogicEndpoint(
            "PATCH",
            "/me",
            "update_me",
            "Change the caller's profile fields",
            "accounts",
            update_me,
            body={**object_schema(_PROFILE_FIELDS), "minProperties": 1},
            response=PROFILE_SCHEMA,
        ),
        LogicEndpoint(
            "GET",
            "/users/{name}",
            "get_user",
            "Another account's public profile",
            "accounts",
            get_user,
            params={"name": NAME_PARAM},
            response=PROFILE_SCHEMA,
        ),
        LogicEndpoint(
            "POST",
            "/me/password",
            "change_password",
            "Change the caller's password (the current one proves it is them); the "
            "user's other devices are logged out",
            "accounts",
            change_password,
            body=object_schema(
                {"current_password": _PASSWORD, "new_password": _PASSWORD},
                ["current_password", "new_password"],
            ),
            response=object_schema(
                {
                    "ok": {"type": "boolean"},
                    "other_sessions_ended": {"type": "boolean"},
                    "logged_out_devices": {"type": "array", "items": {"type": "string"}},
                },
                ["ok", "other_sessions_ended", "logged_out_devices"],
            ),
            errors=(403, 429),
            description=(
                "Every session of the user's other devices ends (their tokens and "
                "resumption tickets stop working; connected ones are kicked with "
                "`LOGGED_OUT`); the calling device stays logged in. "
                "`other_sessions_ended` is false when the session store could not be "
                "reached: the password is changed, and those sessions end when they "
                "expire."
            ),
        ),
        LogicEndpoint(
            "DELETE",
            "/me",
            "delete_me",
            "Delete the caller's account and everything it owns; its session ends",
            "accounts",
            delete_me,
            body=object_schema({"password": _PASSWORD}, ["password"]),
            response=object_schema({"deleted": {"type": "string"}}, ["deleted"]),
            errors=(403, 429),
        ),
    ]
