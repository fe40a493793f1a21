"""SOS alarms over HTTP: raise one, list and read them, acknowledge one."""

from __future__ import annotations

from typing import Any

from cim.http.schema import TIMESTAMP, array_of, listing_of, object_schema
from cim.http.site import Reply
from cim.json_convention import iso_time, listing, present
from cim.logic.http.accounts import NAME_PARAM
from cim.logic.http.api import LogicCall, LogicEndpoint, answer
from cim.logic.sos import SosAlarms
from cim.storage.sos import SosEvent

__all__ = ["sos_endpoints", "sos_json"]

MAX_LIST = 100
DEFAULT_LIST = 20
MAX_ACCURACY_M = 100_000.0

_UNTIL_HANDLED = "left out until a guardian acknowledges the alarm"
SOS_FIELDS: dict[str, dict[str, Any]] = {
    "id": {"type": "integer"},
    "device": {"type": "string"},
    "lat": {"type": "number"},
    "lon": {"type": "number"},
    "accuracy_m": {"type": "number", "description": "left out when the device sent none"},
    "battery": {"type": "integer", "description": "left out when the device sent none"},
    "raised_at": TIMESTAMP,
    "handled_by": {"type": "string", "description": _UNTIL_HANDLED},
    "handled_at": {**TIMESTAMP, "description": _UNTIL_HANDLED},
}
_SOS_REQUIRED = ["id", "device", "lat", "lon", "raised_at"]
SOS_SCHEMA = object_schema(SOS_FIELDS, _SOS_REQUIRED)
RAISED_SCHEMA = object_schema(
    {**SOS_FIELDS, "notified": array_of({"type": "string"})}, [*_SOS_REQUIRED, "notified"]
)


def sos_json(event: SosEvent) -> dict[str, Any]:
    handled_at = event.handled_at
    return present(
        {
            "id": event.id,
            "device": event.device,
            "lat": event.lat,
            "lon": event.lon,
            "accuracy_m": event.accuracy_m,
            "battery": event.battery,
            "raised_at": iso_time(event.raised_at),
            "handled_by": event.handled_by,
            "handled_at": None if handled_at is None else iso_time(handled_at),
        }
    )


def sos_endpoints(alarms: SosAlarms) -> list[LogicEndpoint]:
    async def raise_alarm(call: LogicCall) -> Reply:
        body = call.body
        accuracy = body.get("accuracy_m")
        battery = body.get("battery")
        event, guardians = await alarms.raise_alarm(
            call.user,
            float(body["lat"]),
            float(body["lon"]),
            None if accuracy is None else float(accuracy),
            None if battery is None else int(battery),
        )
        return answer(201, {**sos_json(event), "notified": guardians})

    async def list_alarms(call: LogicCall) -> Reply:
        device = call.query.get("device")
        events = await alarms.alarms(
            call.user,
            None if device is None else str(device),
            int(call.query.get("limit", DEFAULT_LIST)),
        )
        return answer(200, listing([sos_json(event) for event in events]))

    async def get_alarm(call: LogicCall) -> Reply:
        return answer(200, sos_json(await alarms.alarm(call.user.user, int(call.params["id"]))))

    async def acknowledge(call: LogicCall) -> Reply:
        event = await alarms.acknowledge(call.user.user, int(call.params["id"]))
        return answer(200, sos_json(event))

    return [
        LogicEndpoint(
            "POST",
            "/sos",
            "raise_sos",
            "Raise an SOS alarm from the calling device",
            "sos",
            raise_alarm,
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
        LogicEndpoint(
            "GET",
            "/sos",
            "list_sos",
            "Recent SOS alarms of a device, newest first",
            "sos",
            list_alarms,
            query={
                "device": {**NAME_PARAM, "maxLength": 64},
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST},
            },
            response=listing_of(SOS_SCHEMA, MAX_LIST),
            errors=(403,),
            description=(
                "The device itself or its active guardians. Without `device`: a "
                "device's own alarms, or a person's devices' alarms together."
            ),
        ),
        LogicEndpoint(
            "GET",
            "/sos/{id}",
            "get_sos",
            "One SOS alarm",
            "sos",
            get_alarm,
            params={"id": {"type": "integer"}},
            response=SOS_SCHEMA,
            errors=(403,),
        ),
        LogicEndpoint(
            "POST",
            "/sos/{id}/ack",
            "acknowledge_sos",
            "Take charge of an SOS alarm (an active guardian of its device)",
            "sos",
            acknowledge,
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
