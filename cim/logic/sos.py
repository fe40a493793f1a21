"""SOS alarms: a device calls for help and every active guardian hears it at once.

The alarm is stored first, then sent to each guardian active at that moment as a
high-priority system message, which reaches them on whichever node they are
connected to, or at their next login. The first guardian to acknowledge it handles
it; the device and the other guardians are told who did, so nobody drives across
town for an alarm someone else has already answered.
"""

from __future__ import annotations

from typing import Any

from cim.accounts.store import USER_NAME
from cim.http.site import HttpError
from cim.logic.accounts import NAME_PARAM
from cim.logic.api import Answer, Call, Endpoint, array_of, object_schema
from cim.logic.context import LogicContext
from cim.storage.bindings import is_active_guardian_txn
from cim.storage.sos import (
    SosEvent,
    acknowledge_sos_txn,
    guarded_devices_txn,
    list_sos_txn,
    raise_sos_txn,
    sos_event_txn,
)

__all__ = ["SosApi", "sos_json"]

MAX_LIST = 100
DEFAULT_LIST = 20
MAX_ACCURACY_M = 100_000.0

_NULLABLE_NAME = {"type": ["string", "null"]}
_NULLABLE_TIME = {"type": ["number", "null"]}
SOS_FIELDS: dict[str, dict[str, Any]] = {
    "id": {"type": "integer"},
    "device": {"type": "string"},
    "lat": {"type": "number"},
    "lon": {"type": "number"},
    "accuracy_m": {"type": ["number", "null"]},
    "battery": {"type": ["integer", "null"]},
    "raised_at": {"type": "number"},
    "handled_by": _NULLABLE_NAME,
    "handled_at": _NULLABLE_TIME,
}
SOS_SCHEMA = object_schema(SOS_FIELDS, list(SOS_FIELDS))
RAISED_SCHEMA = object_schema(
    {**SOS_FIELDS, "notified": array_of({"type": "string"})}, [*SOS_FIELDS, "notified"]
)


def sos_json(event: SosEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "device": event.device,
        "lat": event.lat,
        "lon": event.lon,
        "accuracy_m": event.accuracy_m,
        "battery": event.battery,
        "raised_at": event.raised_at,
        "handled_by": event.handled_by,
        "handled_at": event.handled_at,
    }


class SosApi:
    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                "POST",
                "/sos",
                "raise_sos",
                "Raise an SOS alarm from the calling device",
                "sos",
                self.raise_alarm,
                body=object_schema(
                    {
                        "lat": {"type": "number", "minimum": -90, "maximum": 90},
                        "lon": {"type": "number", "minimum": -180, "maximum": 180},
                        "accuracy_m": {"type": "number", "minimum": 0, "maximum": MAX_ACCURACY_M},
                        "battery": {"type": "integer", "minimum": 0, "maximum": 100},
                    },
                    ["lat", "lon"],
                ),
                response=RAISED_SCHEMA,
                status=201,
                errors=(403,),
                description=(
                    "Device accounts only. Every active guardian gets an `sos.raised` "
                    "notice with priority `high`; `notified` names them."
                ),
            ),
            Endpoint(
                "GET",
                "/sos",
                "list_sos",
                "Recent SOS alarms of a device, newest first",
                "sos",
                self.list_alarms,
                query={
                    "device": {**NAME_PARAM, "maxLength": 64},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST},
                },
                response=object_schema({"events": array_of(SOS_SCHEMA)}, ["events"]),
                errors=(403,),
                description=(
                    "The device itself or its active guardians. Without `device`: a "
                    "device's own alarms, or a person's devices' alarms together."
                ),
            ),
            Endpoint(
                "GET",
                "/sos/{id}",
                "get_sos",
                "One SOS alarm",
                "sos",
                self.get_alarm,
                params={"id": {"type": "integer"}},
                response=SOS_SCHEMA,
                errors=(403,),
            ),
            Endpoint(
                "POST",
                "/sos/{id}/ack",
                "acknowledge_sos",
                "Take charge of an SOS alarm (an active guardian of its device)",
                "sos",
                self.acknowledge,
                params={"id": {"type": "integer"}},
                response=SOS_SCHEMA,
                errors=(403,),
                description=(
                    "The first acknowledgement sets `handled_by`/`handled_at` and tells the "
                    "device and the other guardians (`sos.handled`); a later one answers "
                    "the event unchanged and tells nobody."
                ),
            ),
        ]

    async def raise_alarm(self, call: Call) -> Answer:
        caller = call.user
        if not caller.is_device:
            raise HttpError(403, "devices_only", "only a device account raises an SOS")
        body = call.body
        accuracy = body.get("accuracy_m")
        battery = body.get("battery")
        event, guardians = await self.ctx.database.run(
            raise_sos_txn,
            caller.user,
            float(body["lat"]),
            float(body["lon"]),
            None if accuracy is None else float(accuracy),
            None if battery is None else int(battery),
            self.ctx.now(),
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
        return 201, {**sos_json(event), "notified": guardians}

    async def list_alarms(self, call: Call) -> Answer:
        caller = call.user
        limit = int(call.query.get("limit", DEFAULT_LIST))
        device = call.query.get("device")
        if device is None:
            if caller.is_device:
                devices = [caller.user]
            else:
                devices = await self.ctx.database.run(guarded_devices_txn, caller.user)
        else:
            device = str(device)
            # The framework checks a query's length, not its pattern.
            if USER_NAME.fullmatch(device) is None:
                raise HttpError(400, "bad_request", "query device: not an account name")
            if device != caller.user and not await self.ctx.database.run(
                is_active_guardian_txn, device, caller.user
            ):
                raise HttpError(403, "not_guardian", "not a guardian of that device")
            devices = [device]
        events = await self.ctx.database.run(list_sos_txn, devices, limit)
        return 200, {"events": [sos_json(event) for event in events]}

    async def _visible(self, call: Call) -> SosEvent:
        event = await self.ctx.database.run(sos_event_txn, int(call.params["id"]))
        if event is None:
            raise HttpError(404, "not_found", "no such SOS event")
        caller = call.user.user
        if caller != event.device and not await self.ctx.database.run(
            is_active_guardian_txn, event.device, caller
        ):
            raise HttpError(403, "not_guardian", "not a guardian of that device")
        return event

    async def get_alarm(self, call: Call) -> Answer:
        return 200, sos_json(await self._visible(call))

    async def acknowledge(self, call: Call) -> Answer:
        guardian = call.user.user
        outcome = await self.ctx.database.run(
            acknowledge_sos_txn, int(call.params["id"]), guardian, self.ctx.now()
        )
        if outcome is None:
            event = await self._visible(call)
            # The device itself may see its alarm but not handle it.
            raise HttpError(403, "not_guardian", f"only a guardian of {event.device} can")
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
        return 200, sos_json(event)
