"""Binding devices over HTTP: binding codes, binding, listing, approving, unbinding."""

from __future__ import annotations

from typing import Any

from cim.http.schema import TIMESTAMP, listing_of, object_schema
from cim.http.site import Reply
from cim.json_convention import iso_time, listing, present
from cim.logic.bindings import Bindings
from cim.logic.http.accounts import NAME_PARAM
from cim.logic.http.api import LogicCall, LogicEndpoint, answer
from cim.storage.bindings import ACTIVE, PENDING, Binding

__all__ = ["binding_endpoints", "binding_json"]

_NAME = {**NAME_PARAM, "maxLength": 64}
BINDING_SCHEMA = object_schema(
    {
        "device": {"type": "string"},
        "guardian": {"type": "string"},
        "status": {"type": "string", "enum": [ACTIVE, PENDING]},
        "created_at": TIMESTAMP,
        "approved_by": {"type": "string", "description": "left out while pending"},
        "approved_at": {**TIMESTAMP, "description": "left out while pending"},
    },
    ["device", "guardian", "status", "created_at"],
)
_PAIR_PARAMS = {"device": NAME_PARAM, "guardian": NAME_PARAM}


def binding_json(binding: Binding) -> dict[str, Any]:
    approved_at = binding.approved_at
    return present(
        {
            "device": binding.device,
            "guardian": binding.guardian,
            "status": binding.status,
            "created_at": iso_time(binding.created_at),
            "approved_by": binding.approved_by,
            "approved_at": None if approved_at is None else iso_time(approved_at),
        }
    )


def binding_endpoints(bindings: Bindings) -> list[LogicEndpoint]:
    async def create_code(call: LogicCall) -> Reply:
        code, expires_at = await bindings.create_code(call.user)
        return answer(201, {"code": code, "expires_at": iso_time(expires_at)})

    async def bind(call: LogicCall) -> Reply:
        binding, created = await bindings.bind(
            call.user, str(call.body["device"]), str(call.body["code"])
        )
        return answer(201 if created else 200, binding_json(binding))

    async def list_bindings(call: LogicCall) -> Reply:
        found = await bindings.bindings_of(call.user.user)
        return answer(200, listing([binding_json(binding) for binding in found]))

    async def approve(call: LogicCall) -> Reply:
        device, guardian = str(call.params["device"]), str(call.params["guardian"])
        return answer(200, binding_json(await bindings.approve(call.user.user, device, guardian)))

    async def unbind(call: LogicCall) -> Reply:
        device, guardian = str(call.params["device"]), str(call.params["guardian"])
        await bindings.unbind(call.user.user, device, guardian)
        return answer(200, {"device": device, "guardian": guardian, "removed": True})

    return [
        LogicEndpoint(
            "POST",
            "/devices/me/binding-code",
            "create_binding_code",
            "A fresh binding code for the calling device (replaces its last one)",
            "bindings",
            create_code,
            response=object_schema(
                {"code": {"type": "string"}, "expires_at": TIMESTAMP},
                ["code", "expires_at"],
            ),
            status=201,
            errors=(403,),
            description=(
                "Device accounts only. Show the code to the person who will bind; it "
                "works once, until `expires_at` ([logic] binding_code_ttl)."
            ),
        ),
        LogicEndpoint(
            "POST",
            "/bindings",
            "create_binding",
            "Bind the caller to a device with the code the device shows",
            "bindings",
            bind,
            body=object_schema(
                {
                    "device": _NAME,
                    "code": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 32,
                        "writeOnly": True,
                    },
                },
                ["device", "code"],
            ),
            response=BINDING_SCHEMA,
            status=201,
            also=(200,),
            errors=(403, 409, 410, 429),
            description=(
                "Person accounts only. The device's first binding is `active` at once; "
                "later ones are `pending` until its first guardian approves. Binding "
                "again to a device one is already bound (or waiting) for answers 200 "
                "with the existing binding. A wrong code is 403 `wrong_code`, an expired "
                "one 410 `expired_code`; too many wrong codes, 429."
            ),
        ),
        LogicEndpoint(
            "GET",
            "/bindings",
            "list_bindings",
            "The caller's bindings, from either side",
            "bindings",
            list_bindings,
            response=listing_of(BINDING_SCHEMA),
            description=(
                "A device sees all its guardians, pending ones included; a person its "
                "own bindings, plus the pending requests for devices it is the first "
                "guardian of."
            ),
        ),
        LogicEndpoint(
            "POST",
            "/bindings/{device}/{guardian}/approve",
            "approve_binding",
            "Let a pending guardian in (the device's first guardian only)",
            "bindings",
            approve,
            params=_PAIR_PARAMS,
            response=BINDING_SCHEMA,
            errors=(403,),
        ),
        LogicEndpoint(
            "DELETE",
            "/bindings/{device}/{guardian}",
            "delete_binding",
            "Unbind, or decline a pending request",
            "bindings",
            unbind,
            params=_PAIR_PARAMS,
            response=object_schema(
                {
                    "device": {"type": "string"},
                    "guardian": {"type": "string"},
                    "removed": {"type": "boolean"},
                },
                ["device", "guardian", "removed"],
            ),
            errors=(403,),
            description="Allowed to the device, to that guardian and to the first guardian.",
        ),
    ]
