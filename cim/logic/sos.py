"""SOS alarms: a device calls for help and every active guardian hears it at once.

The alarm is stored first, then sent to each guardian active at that moment as a
high-priority system message, which reaches them on whichever node they are
connected to, or at their next login. The first guardian to acknowledge it handles
it; the device and the other guardians are told who did, so nobody drives across
town for an alarm someone else has already answered.
"""

from __future__ import annotations

from cim.accounts.store import USER_NAME
from cim.limits.policy import SOS
from cim.logic.context import Caller, LogicContext
from cim.logic.errors import BadInput, Forbidden, NotFound, TooManyAttempts
from cim.storage.bindings import is_active_guardian_txn
from cim.storage.sos import (
    SosEvent,
    acknowledge_sos_txn,
    guarded_devices_txn,
    list_sos_txn,
    raise_sos_txn,
    sos_event_txn,
)

__all__ = ["SosAlarms"]


class SosAlarms:
    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx

    async def raise_alarm(
        self,
        caller: Caller,
        lat: float,
        lon: float,
        accuracy_m: float | None,
        battery: int | None,
    ) -> tuple[SosEvent, list[str]]:
        """The stored alarm, and the guardians it was sent to."""
        if not caller.is_device:
            raise Forbidden("devices_only", "only a device account raises an SOS")
        # Each alarm reaches every guardian at once, marked urgent: a device gets
        # [limits] sos of them (a 429 with Retry-After past it).
        wait = self.ctx.limits.take(SOS, caller.user)
        if wait > 0:
            raise TooManyAttempts("rate_limited", "too many SOS alarms; try again later", wait)
        event, guardians = await self.ctx.database.run(
            raise_sos_txn, caller.user, lat, lon, accuracy_m, battery, self.ctx.now()
        )
        await self.ctx.notices.send(
            guardians,
            "sos.raised",
            urgent=True,
            sos=event.id,
            device=event.device,
            lat=event.lat,
            lon=event.lon,
            accuracy_m=event.accuracy_m,
            battery=event.battery,
            raised_at=event.raised_at,
        )
        return event, guardians

    async def alarms(self, caller: Caller, device: str | None, limit: int) -> list[SosEvent]:
        """Recent alarms of ``device``; without one, the caller's own or its devices'."""
        if device is None:
            if caller.is_device:
                devices = [caller.user]
            else:
                devices = await self.ctx.database.run(guarded_devices_txn, caller.user)
        else:
            # The framework checks a query's length, not its pattern.
            if USER_NAME.fullmatch(device) is None:
                raise BadInput("bad_request", "query device: not an account name")
            if device != caller.user and not await self.ctx.database.run(
                is_active_guardian_txn, device, caller.user
            ):
                raise Forbidden("not_guardian", "not a guardian of that device")
            devices = [device]
        return list(await self.ctx.database.run(list_sos_txn, devices, limit))

    async def alarm(self, user: str, sos_id: int) -> SosEvent:
        """One alarm, for the device itself or an active guardian of it."""
        event = await self.ctx.database.run(sos_event_txn, sos_id)
        if event is None:
            raise NotFound("not_found", "no such SOS event")
        if user != event.device and not await self.ctx.database.run(
            is_active_guardian_txn, event.device, user
        ):
            raise Forbidden("not_guardian", "not a guardian of that device")
        return event

    async def acknowledge(self, guardian: str, sos_id: int) -> SosEvent:
        """Take charge: the first acknowledgement tells the device and the others."""
        outcome = await self.ctx.database.run(acknowledge_sos_txn, sos_id, guardian, self.ctx.now())
        if outcome is None:
            event = await self.alarm(guardian, sos_id)
            # The device itself may see its alarm but not handle it.
            raise Forbidden("not_guardian", f"only a guardian of {event.device} can")
        event = outcome.event
        if outcome.first:
            others = [name for name in outcome.guardians if name != guardian]
            await self.ctx.notices.send(
                [event.device, *others],
                "sos.handled",
                sos=event.id,
                device=event.device,
                handled_by=event.handled_by,
                handled_at=event.handled_at,
            )
        return event
