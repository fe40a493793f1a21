"""Binding devices (a child's watch, a tracker) to the people who look after them.

A device account asks for a short code and shows it; a person types it in. The code
is random digits from ``secrets``, kept only as a SHA-256 hash, compared in constant
time, short-lived and single-use. Guessing is throttled twice: per person (the usual
failed-login throttle) and per device, so many accounts together cannot sweep one
device's code space either; the device's own counter starts again when it asks for
a new code, which is also how its owner gets past a stranger's guessing.

The first person to bind a device is its first guardian at once; later ones wait,
"pending", until the first guardian approves them. "First" is whoever has been active
longest, so when that guardian leaves, the next one takes over.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from cim.http.site import HttpError, too_many_requests
from cim.logic.accounts import NAME_PARAM
from cim.logic.api import Answer, Call, Endpoint, array_of, object_schema
from cim.logic.context import LogicContext
from cim.storage.bindings import (
    ACTIVE,
    PENDING,
    Binding,
    BindResult,
    approve_binding_txn,
    bind_with_code_txn,
    bindings_of_txn,
    purge_binding_codes_txn,
    remove_binding_txn,
    store_binding_code_txn,
)
from cim.throttle import FailedLoginThrottle

__all__ = ["BindingApi", "binding_json", "code_hash"]

DEVICE_ATTEMPTS_FACTOR = 4
"""Wrong codes one device's code may take per window, as a multiple of the per-person
limit: a few people mistyping do not lock it, a crowd of accounts guessing does."""

_NAME = {**NAME_PARAM, "maxLength": 64}
_NULLABLE_NAME = {"type": ["string", "null"]}
_NULLABLE_TIME = {"type": ["number", "null"]}
BINDING_SCHEMA = object_schema(
    {
        "device": {"type": "string"},
        "guardian": {"type": "string"},
        "status": {"type": "string", "enum": [ACTIVE, PENDING]},
        "created_at": {"type": "number"},
        "approved_by": _NULLABLE_NAME,
        "approved_at": _NULLABLE_TIME,
    },
    ["device", "guardian", "status", "created_at", "approved_by", "approved_at"],
)
_PAIR_PARAMS = {"device": NAME_PARAM, "guardian": NAME_PARAM}


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def binding_json(binding: Binding) -> dict[str, Any]:
    return {
        "device": binding.device,
        "guardian": binding.guardian,
        "status": binding.status,
        "created_at": binding.created_at,
        "approved_by": binding.approved_by,
        "approved_at": binding.approved_at,
    }


class BindingApi:
    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx
        config = ctx.config
        self._person_failures = FailedLoginThrottle(
            ctx.clock, config.binding_attempts, config.binding_attempt_window
        )
        self._device_failures = FailedLoginThrottle(
            ctx.clock,
            config.binding_attempts * DEVICE_ATTEMPTS_FACTOR,
            config.binding_attempt_window,
        )

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                "POST",
                "/devices/me/binding-code",
                "create_binding_code",
                "A fresh binding code for the calling device (replaces its last one)",
                "bindings",
                self.create_code,
                response=object_schema(
                    {"code": {"type": "string"}, "expires_at": {"type": "number"}},
                    ["code", "expires_at"],
                ),
                status=201,
                errors=(403,),
                description=(
                    "Device accounts only. Show the code to the person who will bind; it "
                    "works once, until `expires_at` ([logic] binding_code_ttl)."
                ),
            ),
            Endpoint(
                "POST",
                "/bindings",
                "create_binding",
                "Bind the caller to a device with the code the device shows",
                "bindings",
                self.bind,
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
            Endpoint(
                "GET",
                "/bindings",
                "list_bindings",
                "The caller's bindings, from either side",
                "bindings",
                self.list_bindings,
                response=object_schema({"bindings": array_of(BINDING_SCHEMA)}, ["bindings"]),
                description=(
                    "A device sees all its guardians, pending ones included; a person its "
                    "own bindings, plus the pending requests for devices it is the first "
                    "guardian of."
                ),
            ),
            Endpoint(
                "POST",
                "/bindings/{device}/{guardian}/approve",
                "approve_binding",
                "Let a pending guardian in (the device's first guardian only)",
                "bindings",
                self.approve,
                params=_PAIR_PARAMS,
                response=BINDING_SCHEMA,
                errors=(403,),
            ),
            Endpoint(
                "DELETE",
                "/bindings/{device}/{guardian}",
                "delete_binding",
                "Unbind, or decline a pending request",
                "bindings",
                self.unbind,
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

    # --- codes ----------------------------------------------------------------------------

    async def create_code(self, call: Call) -> Answer:
        caller = call.user
        if not caller.is_device:
            raise HttpError(403, "devices_only", "only a device account asks for a binding code")
        digits = self.ctx.config.binding_code_digits
        code = str(secrets.randbelow(10**digits)).zfill(digits)
        now = self.ctx.now()
        expires_at = now + self.ctx.config.binding_code_ttl
        await self.ctx.database.run(
            store_binding_code_txn, caller.user, code_hash(code), expires_at, now
        )
        # Only the device can make a new code, so a stranger's guessing at the old one
        # must not keep its owner out of the new one.
        self._device_failures.record_success(caller.user)
        return 201, {"code": code, "expires_at": expires_at}

    # --- binding --------------------------------------------------------------------------

    async def bind(self, call: Call) -> Answer:
        caller = call.user
        if caller.is_device:
            raise HttpError(403, "persons_only", "a device cannot bind to a device")
        device = str(call.body["device"])
        self._check_throttles(caller.user, device)
        # Counted as wrong until the database says otherwise, so codes sent all at once
        # cannot each pass the throttles before any of them is recorded.
        self._person_failures.record_failure(caller.user)
        self._device_failures.record_failure(device)
        try:
            outcome = await self.ctx.database.run(
                bind_with_code_txn,
                device,
                caller.user,
                code_hash(str(call.body["code"])),
                self.ctx.now(),
            )
        except BaseException:
            self._forgive_attempt(caller.user, device)  # no answer is not a wrong code
            raise
        if outcome.result is not BindResult.WRONG_CODE:
            self._forgive_attempt(caller.user, device)
        if outcome.result is BindResult.NO_DEVICE:
            raise HttpError(404, "not_found", "no such device")
        if outcome.result is BindResult.WRONG_CODE:
            raise HttpError(403, "wrong_code", "that is not the device's binding code")
        if outcome.result is BindResult.EXPIRED_CODE:
            raise HttpError(
                410,
                "expired_code",
                "the code has expired; ask the device for a new one",
            )
        binding = outcome.binding
        assert binding is not None
        if outcome.result is BindResult.EXISTS:
            return 200, binding_json(binding)
        if binding.status == ACTIVE:
            await self.ctx.notices.send(
                [binding.device, binding.guardian],
                "binding.created",
                device=binding.device,
                guardian=binding.guardian,
                status=binding.status,
            )
        elif outcome.first_guardian is not None:
            await self.ctx.notices.send(
                [outcome.first_guardian],
                "binding.requested",
                device=binding.device,
                guardian=binding.guardian,
            )
        return 201, binding_json(binding)

    def _forgive_attempt(self, person: str, device: str) -> None:
        """Take back only this attempt's count, never reset it: an attacker could bind
        a device of their own to clear theirs and keep guessing someone else's."""
        self._person_failures.forgive(person)
        self._device_failures.forgive(device)

    def _check_throttles(self, person: str, device: str) -> None:
        wait = self._person_failures.blocked(person)
        if wait:
            raise too_many_requests("too_many_attempts", "too many wrong binding codes", wait)
        wait = self._device_failures.blocked(device)
        if wait:
            raise too_many_requests(
                "too_many_attempts",
                "too many wrong codes for this device; it can show a new one",
                wait,
            )

    # --- listing, approving, unbinding ----------------------------------------------------

    async def list_bindings(self, call: Call) -> Answer:
        found = await self.ctx.database.run(bindings_of_txn, call.user.user)
        return 200, {"bindings": [binding_json(binding) for binding in found]}

    async def approve(self, call: Call) -> Answer:
        device, guardian = str(call.params["device"]), str(call.params["guardian"])
        approver = call.user.user
        outcome = await self.ctx.database.run(
            approve_binding_txn, device, guardian, approver, self.ctx.now()
        )
        if not outcome.allowed:
            raise HttpError(
                403, "not_first_guardian", "only the device's first guardian approves bindings"
            )
        binding = outcome.binding
        if binding is None:
            raise HttpError(404, "not_found", "no such binding")
        if outcome.changed:
            await self.ctx.notices.send(
                [binding.guardian, binding.device],
                "binding.approved",
                device=binding.device,
                guardian=binding.guardian,
                approved_by=approver,
            )
        return 200, binding_json(binding)

    async def unbind(self, call: Call) -> Answer:
        device, guardian = str(call.params["device"]), str(call.params["guardian"])
        remover = call.user.user
        outcome = await self.ctx.database.run(remove_binding_txn, device, guardian, remover)
        if not outcome.allowed:
            raise HttpError(
                403,
                "not_allowed",
                "only the device, that guardian or the first guardian may remove a binding",
            )
        removed = outcome.binding
        if removed is None or not outcome.changed:
            raise HttpError(404, "not_found", "no such binding")
        if removed.status == ACTIVE:
            reason = "unbound"
        elif remover == guardian:
            reason = "withdrawn"
        else:
            reason = "declined"
        await self.ctx.notices.send(
            [device, guardian],
            "binding.removed",
            device=device,
            guardian=guardian,
            removed_by=remover,
            reason=reason,
        )
        return 200, {"device": device, "guardian": guardian, "removed": True}

    async def housekeeping(self) -> None:
        await self.ctx.database.run(purge_binding_codes_txn, self.ctx.now())
