"""``/api/v1/devices/me/push`` on the logic service: the calling device's registration.

``me`` is the session's device, from the router's token like every caller of the
logic service: a device registers, replaces or removes its own registration only.
The endpoints run under the logic service's authentication, rate limits, body checks
and error answers (cim.logic.http.api).
"""

from __future__ import annotations

from typing import Any

from cim.http.schema import TIMESTAMP, object_schema
from cim.http.site import Reply
from cim.logic.errors import NotFound
from cim.logic.http.api import LogicCall, LogicEndpoint, answer
from cim.push.registrations import Registrations, registration_json
from cim.storage.schema import PUSH_APP_MAX, PUSH_LOCALE_MAX, PUSH_PROVIDER_NAMES, PUSH_TOKEN_MAX

__all__ = ["push_endpoints"]

PATH = "/devices/me/push"
REGISTRATION_SCHEMA = object_schema(
    {
        "device": {"type": "string"},
        "provider": {"type": "string", "enum": list(PUSH_PROVIDER_NAMES)},
        "token": {"type": "string"},
        "app": {"type": "string"},
        "locale": {"type": "string"},
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
    },
    ["device", "provider", "token", "created_at", "updated_at"],
)
REMOVED_SCHEMA = object_schema(
    {"device": {"type": "string"}, "removed": {"type": "boolean"}}, ["device", "removed"]
)
REQUEST_SCHEMA = object_schema(
    {
        "provider": {"type": "string", "enum": list(PUSH_PROVIDER_NAMES)},
        "token": {"type": "string", "minLength": 1, "maxLength": PUSH_TOKEN_MAX},
        "app": {"type": "string", "minLength": 1, "maxLength": PUSH_APP_MAX},
        "locale": {"type": "string", "minLength": 2, "maxLength": PUSH_LOCALE_MAX},
    },
    ["provider", "token"],
)


def push_endpoints(registrations: Registrations) -> list[LogicEndpoint]:
    async def register(call: LogicCall) -> Reply:
        body = call.body
        app: Any = body.get("app")
        locale: Any = body.get("locale")
        stored = await registrations.register(
            call.user.user,
            call.user.device,
            str(body["provider"]),
            str(body["token"]),
            None if app is None else str(app),
            None if locale is None else str(locale),
            peer=call.address,
        )
        return answer(200, registration_json(stored))

    async def remove(call: LogicCall) -> Reply:
        if not await registrations.remove(call.user.user, call.user.device, peer=call.address):
            raise NotFound("not_registered", "this device has no push registration")
        return answer(200, {"device": call.user.device, "removed": True})

    async def show(call: LogicCall) -> Reply:
        found = await registrations.of_device(call.user.user, call.user.device)
        if found is None:
            raise NotFound("not_registered", "this device has no push registration")
        return answer(200, registration_json(found))

    return [
        LogicEndpoint(
            "PUT",
            PATH,
            "register_push",
            "Register or replace the calling device's push registration",
            "push",
            register,
            body=REQUEST_SCHEMA,
            response=REGISTRATION_SCHEMA,
            errors=(403,),
            description=(
                "The device of the caller's session gets pushes through `provider` "
                "while it is not connected (docs/push.md). 403 `push_disabled` when "
                "the server does not push; 400 `provider_unavailable` for a provider "
                "it does not push through."
            ),
        ),
        LogicEndpoint(
            "GET",
            PATH,
            "get_push",
            "The calling device's push registration",
            "push",
            show,
            response=REGISTRATION_SCHEMA,
        ),
        LogicEndpoint(
            "DELETE",
            PATH,
            "remove_push",
            "Remove the calling device's push registration",
            "push",
            remove,
            response=REMOVED_SCHEMA,
        ),
    ]
