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

from cim.logic.context import Caller, LogicContext
from cim.logic.errors import Expired, Forbidden, NotFound, TooManyAttempts
from cim.storage.bindings import (
    ACTIVE,
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

__all__ = ["Bindings", "code_hash"]

DEVICE_ATTEMPTS_FACTOR = 4
"""Wrong codes one device's code may take per window, as a multiple of the per-person
limit: a few people mistyping do not lock it, a crowd of accounts guessing does."""


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


class Bindings:
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

    # --- codes ----------------------------------------------------------------------------

    async def create_code(self, caller: Caller) -> tuple[str, float]:
        """A fresh code for the calling device, and when it expires."""
        if not caller.is_device:
            raise Forbidden("devices_only", "only a device account asks for a binding code")
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
        return code, expires_at

    # --- binding --------------------------------------------------------------------------

    async def bind(self, caller: Caller, device: str, code: str) -> tuple[Binding, bool]:
        """The caller's binding to ``device``, and whether this call created it."""
        if caller.is_device:
            raise Forbidden("persons_only", "a device cannot bind to a device")
        self._check_throttles(caller.user, device)
        # Counted as wrong until the database says otherwise, so codes sent all at once
        # cannot each pass the throttles before any of them is recorded.
        self._person_failures.record_failure(caller.user)
        self._device_failures.record_failure(device)
        try:
            outcome = await self.ctx.database.run(
                bind_with_code_txn, device, caller.user, code_hash(code), self.ctx.now()
            )
        except BaseException:
            self._forgive_attempt(caller.user, device)  # no answer is not a wrong code
            raise
        if outcome.result is not BindResult.WRONG_CODE:
            self._forgive_attempt(caller.user, device)
        if outcome.result is BindResult.NO_DEVICE:
            raise NotFound("not_found", "no such device")
        if outcome.result is BindResult.WRONG_CODE:
            raise Forbidden("wrong_code", "that is not the device's binding code")
        if outcome.result is BindResult.EXPIRED_CODE:
            raise Expired("expired_code", "the code has expired; ask the device for a new one")
        binding = outcome.binding
        assert binding is not None
        if outcome.result is BindResult.EXISTS:
            return binding, False
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
        return binding, True

    def _forgive_attempt(self, person: str, device: str) -> None:
        """Take back only this attempt's count, never reset it: an attacker could bind
        a device of their own to clear theirs and keep guessing someone else's."""
        self._person_failures.forgive(person)
        self._device_failures.forgive(device)

    def _check_throttles(self, person: str, device: str) -> None:
        wait = self._person_failures.blocked(person)
        if wait:
            raise TooManyAttempts("too_many_attempts", "too many wrong binding codes", wait)
        wait = self._device_failures.blocked(device)
        if wait:
            raise TooManyAttempts(
                "too_many_attempts",
                "too many wrong codes for this device; it can show a new one",
                wait,
            )

    # --- listing, approving, unbinding ----------------------------------------------------

    async def bindings_of(self, user: str) -> list[Binding]:
        return list(await self.ctx.database.run(bindings_of_txn, user))

    async def approve(self, approver: str, device: str, guardian: str) -> Binding:
        outcome = await self.ctx.database.run(
            approve_binding_txn, device, guardian, approver, self.ctx.now()
        )
        if not outcome.allowed:
            raise Forbidden(
                "not_first_guardian", "only the device's first guardian approves bindings"
            )
        binding = outcome.binding
        if binding is None:
            raise NotFound("not_found", "no such binding")
        if outcome.changed:
            await self.ctx.notices.send(
                [binding.guardian, binding.device],
                "binding.approved",
                device=binding.device,
                guardian=binding.guardian,
                approved_by=approver,
            )
        return binding

    async def unbind(self, remover: str, device: str, guardian: str) -> None:
        outcome = await self.ctx.database.run(remove_binding_txn, device, guardian, remover)
        if not outcome.allowed:
            raise Forbidden(
                "not_allowed",
                "only the device, that guardian or the first guardian may remove a binding",
            )
        removed = outcome.binding
        if removed is None or not outcome.changed:
            raise NotFound("not_found", "no such binding")
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

    async def housekeeping(self) -> None:
        await self.ctx.database.run(purge_binding_codes_txn, self.ctx.now())
