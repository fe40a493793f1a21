"""Geofences and positions over HTTP: fences of a device, reports, position history."""

from __future__ import annotations

from typing import Any

from cim.http.schema import (
    TIME_INPUT,
    TIMESTAMP,
    array_of,
    listing_of,
    object_schema,
    time_value,
)
from cim.http.site import Reply
from cim.json_convention import iso_time, listing, present
from cim.logic.fences import Fences, Fix
from cim.logic.geometry import MAX_FENCE_EXTENT_M
from cim.logic.http.accounts import NAME_PARAM
from cim.logic.http.api import LogicCall, LogicEndpoint, answer
from cim.storage.fences import Fence, Position, Transition
from cim.storage.schema import DISPLAY_NAME_MAX

__all__ = ["fence_endpoints", "fence_json"]

MAX_ACCURACY_M = 1e6
DEFAULT_LOCATIONS = 100
MAX_LOCATIONS = 1000

_LAT = {"type": "number", "minimum": -90, "maximum": 90}
_LON = {"type": "number", "minimum": -180, "maximum": 180}
_CIRCLE = object_schema(
    {
        "lat": _LAT,
        "lon": _LON,
        "radius_m": {"type": "number", "minimum": 1, "maximum": MAX_FENCE_EXTENT_M},
    },
    ["lat", "lon", "radius_m"],
)
_POINT = {
    "type": "array",
    "prefixItems": [_LAT, _LON],
    "minItems": 2,
    "maxItems": 2,
    "description": "[lat, lon]",
}
_POSITION = object_schema(
    {
        "lat": _LAT,
        "lon": _LON,
        "accuracy_m": {"type": "number", "minimum": 0, "maximum": MAX_ACCURACY_M},
        "at": {**TIME_INPUT, "description": "the fix's time, ISO 8601 (default: now)"},
    },
    ["lat", "lon"],
)
_TRANSITION = object_schema(
    {
        "fence": {"type": "integer"},
        "name": {"type": "string"},
        "event": {"type": "string", "enum": ["entered", "left"]},
        "at": TIMESTAMP,
    },
    ["fence", "name", "event", "at"],
)
_POSITION_OUT = object_schema(
    {
        "id": {"type": "integer"},
        "lat": {"type": "number"},
        "lon": {"type": "number"},
        "accuracy_m": {"type": "number", "description": "left out when the device sent none"},
        "at": TIMESTAMP,
        "received_at": TIMESTAMP,
    },
    ["id", "lat", "lon", "at", "received_at"],
)


def fence_json(fence: Fence) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": fence.id,
        "device": fence.device,
        "name": fence.name,
        "shape": fence.shape,
        "created_by": fence.created_by,
        "created_at": iso_time(fence.created_at),
        "state": fence.state,
    }
    if fence.shape == "circle":
        answer["circle"] = fence.geometry
    else:
        answer["polygon"] = fence.geometry["points"]
    return answer


def position_json(position: Position) -> dict[str, Any]:
    return present(
        {
            "id": position.id,
            "lat": position.lat,
            "lon": position.lon,
            "accuracy_m": position.accuracy_m,
            "at": iso_time(position.at),
            "received_at": iso_time(position.received_at),
        }
    )


def transition_json(transition: Transition) -> dict[str, Any]:
    return {
        "fence": transition.fence,
        "name": transition.name,
        "event": transition.event,
        "at": iso_time(transition.at),
    }


def fence_endpoints(fences: Fences) -> list[LogicEndpoint]:
    config = fences.ctx.config

    async def create_fence(call: LogicCall) -> Reply:
        body = call.body
        fence = await fences.create_fence(
            call.user.user,
            str(call.params["device"]),
            str(body["name"]),
            body.get("circle"),
            body.get("polygon"),
        )
        return answer(201, fence_json(fence))

    async def list_fences(call: LogicCall) -> Reply:
        found = await fences.fences_of(call.user.user, str(call.params["device"]))
        return answer(200, listing([fence_json(fence) for fence in found]))

    async def delete_fence(call: LogicCall) -> Reply:
        fence_id = int(call.params["fence"])
        await fences.delete_fence(call.user.user, str(call.params["device"]), fence_id)
        return answer(200, {"deleted": fence_id})

    async def report_locations(call: LogicCall) -> Reply:
        fixes = [_fix(raw, index) for index, raw in enumerate(call.body["positions"])]
        report = await fences.report_positions(call.user, fixes)
        return answer(
            200,
            {
                "accepted": report.accepted,
                "transitions": [transition_json(t) for t in report.transitions],
            },
        )

    async def list_locations(call: LogicCall) -> Reply:
        query = call.query
        found = await fences.positions(
            call.user.user,
            str(call.params["device"]),
            query.get("since"),
            query.get("until"),
            int(query.get("limit", DEFAULT_LOCATIONS)),
        )
        return answer(200, listing([position_json(p) for p in found]))

    fence_schema = object_schema(
        {
            "id": {"type": "integer"},
            "device": {"type": "string"},
            "name": {"type": "string"},
            "shape": {"type": "string", "enum": ["circle", "polygon"]},
            "circle": _CIRCLE,
            "polygon": array_of(_POINT),
            "created_by": {"type": "string"},
            "created_at": TIMESTAMP,
            "state": {"type": "string", "enum": ["unknown", "inside", "outside"]},
        },
        ["id", "device", "name", "shape", "created_by", "created_at", "state"],
    )
    device_param = {"device": NAME_PARAM}
    return [
        LogicEndpoint(
            "POST",
            "/devices/{device}/fences",
            "create_fence",
            "Define a fence (a circle or a polygon) for a bound device",
            "fences",
            create_fence,
            params=device_param,
            body={
                **object_schema(
                    {
                        "name": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": DISPLAY_NAME_MAX,
                        },
                        "circle": _CIRCLE,
                        "polygon": {
                            **array_of(_POINT, config.max_fence_points + 1),
                            "minItems": 3,
                        },
                    },
                    ["name"],
                ),
                "oneOf": [{"required": ["circle"]}, {"required": ["polygon"]}],
            },
            response=fence_schema,
            status=201,
            errors=(403, 409),
            description=(
                "Active guardians of the device only. `circle` is {lat, lon, radius_m} "
                "(1 to 100000 m); `polygon` is 3 or more [lat, lon] vertices, not "
                "self-intersecting, within 100 km of its centre. The fence starts in "
                "state `unknown`: its first confirmed side is not announced."
            ),
        ),
        LogicEndpoint(
            "GET",
            "/devices/{device}/fences",
            "list_fences",
            "The fences of a bound device",
            "fences",
            list_fences,
            params=device_param,
            response=listing_of(fence_schema),
            errors=(403,),
        ),
        LogicEndpoint(
            "DELETE",
            "/devices/{device}/fences/{fence}",
            "delete_fence",
            "Remove one of a bound device's fences",
            "fences",
            delete_fence,
            params={**device_param, "fence": {"type": "integer"}},
            response=object_schema({"deleted": {"type": "integer"}}, ["deleted"]),
            errors=(403,),
        ),
        LogicEndpoint(
            "POST",
            "/locations",
            "report_locations",
            "The calling device reports where it is (one position or a batch)",
            "fences",
            report_locations,
            body=object_schema(
                {
                    "positions": {
                        **array_of(_POSITION, config.max_positions_per_report),
                        "minItems": 1,
                    }
                },
                ["positions"],
            ),
            response=object_schema(
                {"accepted": {"type": "integer"}, "transitions": array_of(_TRANSITION)},
                ["accepted", "transitions"],
            ),
            errors=(403,),
            description=(
                "Devices only. Positions are processed in `at` order; every one is "
                "stored, but one older than the newest already reported, or less "
                "precise than 500 m or the fence's own size, does not move fences."
            ),
        ),
        LogicEndpoint(
            "GET",
            "/devices/{device}/locations",
            "list_locations",
            "A device's position history, newest first",
            "fences",
            list_locations,
            params=device_param,
            query={
                "since": TIME_INPUT,
                "until": TIME_INPUT,
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LOCATIONS},
            },
            response=listing_of(_POSITION_OUT, MAX_LOCATIONS),
            errors=(403,),
            description="The device itself or its active guardians.",
        ),
    ]


def _fix(raw: dict[str, Any], index: int) -> Fix:
    accuracy = raw.get("accuracy_m")
    at = raw.get("at")
    return Fix(
        float(raw["lat"]),
        float(raw["lon"]),
        None if accuracy is None else float(accuracy),
        None if at is None else time_value(str(at), f"positions.{index}.at"),
    )
