"""Geofences and positions: guardians draw fences, the device reports where it is.

A fence is a circle or a polygon that an active guardian defines for a device. The
device reports positions (one or a batch); each one that is precise enough is
placed against every fence of the device, and entering or leaving is announced to
the device's active guardians as a ``fence.entered`` / ``fence.left`` notice.

A position on the boundary must not make the fence flap, so two mechanisms
(``[logic] fence_margin`` and ``fence_confirmations``) keep a crossing from being
announced before it is certain; cim.logic.geometry holds that logic, free of I/O.
Positions are kept for ``location_retention`` and read only by the device and its
active guardians.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cim.http.site import HttpError
from cim.logic.accounts import NAME_PARAM
from cim.logic.api import Answer, Call, Endpoint, array_of, object_schema
from cim.logic.context import LogicContext
from cim.logic.geometry import (
    MAX_FENCE_EXTENT_M,
    FenceShape,
    FenceTrack,
    InvalidFence,
    circle_fence,
    polygon_fence,
    side_of,
    step,
    usable_accuracy,
)
from cim.storage.fences import (
    Fence,
    FenceUpdate,
    NewPosition,
    NotAGuardian,
    Position,
    TooManyFences,
    Transition,
    create_fence_txn,
    delete_fence_txn,
    list_fences_txn,
    positions_txn,
    purge_positions_txn,
    report_positions_txn,
)
from cim.storage.schema import DISPLAY_NAME_MAX

__all__ = ["FenceApi"]

MAX_TIME = 1e11
"""Timestamps are epoch seconds; this is the year 5138, far past any real fix."""
MAX_CLOCK_SKEW = 300.0
"""A fix from further in the future than this is a wrong clock: refused, because it
would make every real position after it look stale."""
MAX_ACCURACY_M = 1e6
DEFAULT_LOCATIONS = 100
MAX_LOCATIONS = 1000
PURGE_BATCH = 1000
PURGE_BATCHES_PER_ROUND = 100

_LAT = {"type": "number", "minimum": -90, "maximum": 90}
_LON = {"type": "number", "minimum": -180, "maximum": 180}
_TIME = {"type": "number", "minimum": 0, "maximum": MAX_TIME}
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
        "at": {**_TIME, "description": "the fix's time, epoch seconds (default: now)"},
    },
    ["lat", "lon"],
)
_TRANSITION = object_schema(
    {
        "fence": {"type": "integer"},
        "name": {"type": "string"},
        "event": {"type": "string", "enum": ["entered", "left"]},
        "at": {"type": "number"},
    },
    ["fence", "name", "event", "at"],
)
_POSITION_OUT = object_schema(
    {
        "id": {"type": "integer"},
        "lat": {"type": "number"},
        "lon": {"type": "number"},
        "accuracy_m": {"type": ["number", "null"]},
        "at": {"type": "number"},
        "received_at": {"type": "number"},
    },
    ["id", "lat", "lon", "accuracy_m", "at", "received_at"],
)


def fence_json(fence: Fence) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": fence.id,
        "device": fence.device,
        "name": fence.name,
        "shape": fence.shape,
        "created_by": fence.created_by,
        "created_at": fence.created_at,
        "state": fence.state,
    }
    if fence.shape == "circle":
        answer["circle"] = fence.geometry
    else:
        answer["polygon"] = fence.geometry["points"]
    return answer


def position_json(position: Position) -> dict[str, Any]:
    return {
        "id": position.id,
        "lat": position.lat,
        "lon": position.lon,
        "accuracy_m": position.accuracy_m,
        "at": position.at,
        "received_at": position.received_at,
    }


def transition_json(transition: Transition) -> dict[str, Any]:
    return {
        "fence": transition.fence,
        "name": transition.name,
        "event": transition.event,
        "at": transition.at,
    }


def shape_of(fence: Fence, max_points: int) -> FenceShape:
    geometry = fence.geometry
    if fence.shape == "circle":
        return circle_fence(geometry["lat"], geometry["lon"], geometry["radius_m"])
    # A fence stored under a larger max_fence_points stays usable after it is lowered.
    return polygon_fence(geometry["points"], max(max_points, len(geometry["points"])))


class FenceApi:
    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx
        self._shapes: dict[tuple[str, str], FenceShape] = {}

    def endpoints(self) -> list[Endpoint]:
        config = self.ctx.config
        fence_schema = object_schema(
            {
                "id": {"type": "integer"},
                "device": {"type": "string"},
                "name": {"type": "string"},
                "shape": {"type": "string", "enum": ["circle", "polygon"]},
                "circle": _CIRCLE,
                "polygon": array_of(_POINT),
                "created_by": {"type": "string"},
                "created_at": {"type": "number"},
                "state": {"type": "string", "enum": ["unknown", "inside", "outside"]},
            },
            ["id", "device", "name", "shape", "created_by", "created_at", "state"],
        )
        device_param = {"device": NAME_PARAM}
        return [
            Endpoint(
                "POST",
                "/devices/{device}/fences",
                "create_fence",
                "Define a fence (a circle or a polygon) for a bound device",
                "fences",
                self.create_fence,
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
            Endpoint(
                "GET",
                "/devices/{device}/fences",
                "list_fences",
                "The fences of a bound device",
                "fences",
                self.list_fences,
                params=device_param,
                response=object_schema({"fences": array_of(fence_schema)}, ["fences"]),
                errors=(403,),
            ),
            Endpoint(
                "DELETE",
                "/devices/{device}/fences/{fence}",
                "delete_fence",
                "Remove one of a bound device's fences",
                "fences",
                self.delete_fence,
                params={**device_param, "fence": {"type": "integer"}},
                response=object_schema({"deleted": {"type": "integer"}}, ["deleted"]),
                errors=(403,),
            ),
            Endpoint(
                "POST",
                "/locations",
                "report_locations",
                "The calling device reports where it is (one position or a batch)",
                "fences",
                self.report_locations,
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
            Endpoint(
                "GET",
                "/devices/{device}/locations",
                "list_locations",
                "A device's position history, newest first",
                "fences",
                self.list_locations,
                params=device_param,
                query={
                    "since": _TIME,
                    "until": _TIME,
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LOCATIONS},
                },
                response=object_schema({"positions": array_of(_POSITION_OUT)}, ["positions"]),
                errors=(403,),
                description="The device itself or its active guardians.",
            ),
        ]

    # --- fences -------------------------------------------------------------------------

    @staticmethod
    def _not_guardian() -> HttpError:
        return HttpError(403, "not_a_guardian", "only the device's active guardians may do this")

    async def create_fence(self, call: Call) -> Answer:
        device = str(call.params["device"])
        body = call.body
        config = self.ctx.config
        geometry: dict[str, Any]
        try:
            if "circle" in body:
                circle = body["circle"]
                geometry = {
                    "lat": float(circle["lat"]),
                    "lon": float(circle["lon"]),
                    "radius_m": float(circle["radius_m"]),
                }
                circle_fence(geometry["lat"], geometry["lon"], geometry["radius_m"])
                shape = "circle"
            else:
                points = [[float(p[0]), float(p[1])] for p in body["polygon"]]
                if len(points) > 1 and points[0] == points[-1]:
                    points.pop()
                polygon_fence(points, config.max_fence_points)
                geometry = {"points": points}
                shape = "polygon"
        except InvalidFence as exc:
            raise HttpError(400, "invalid_fence", str(exc)) from None
        try:
            fence = await self.ctx.database.run(
                create_fence_txn,
                device,
                call.user.user,
                str(body["name"]),
                shape,
                geometry,
                self.ctx.now(),
                config.max_fences_per_device,
            )
        except NotAGuardian:
            raise self._not_guardian() from None
        except TooManyFences:
            raise HttpError(
                409,
                "too_many_fences",
                f"a device may have at most {config.max_fences_per_device} fences",
            ) from None
        return 201, fence_json(fence)

    async def list_fences(self, call: Call) -> Answer:
        try:
            found = await self.ctx.database.run(
                list_fences_txn, str(call.params["device"]), call.user.user
            )
        except NotAGuardian:
            raise self._not_guardian() from None
        return 200, {"fences": [fence_json(fence) for fence in found]}

    async def delete_fence(self, call: Call) -> Answer:
        fence_id = int(call.params["fence"])
        try:
            deleted = await self.ctx.database.run(
                delete_fence_txn, str(call.params["device"]), call.user.user, fence_id
            )
        except NotAGuardian:
            raise self._not_guardian() from None
        if not deleted:
            raise HttpError(404, "not_found", "the device has no such fence")
        return 200, {"deleted": fence_id}

    # --- positions ----------------------------------------------------------------------

    async def report_locations(self, call: Call) -> Answer:
        if not call.user.is_device:
            raise HttpError(403, "devices_only", "only a device reports its own positions")
        now = self.ctx.now()
        positions = []
        for index, raw in enumerate(call.body["positions"]):
            at = float(raw.get("at", now))
            if at > now + MAX_CLOCK_SKEW:
                raise HttpError(
                    400,
                    "bad_request",
                    f"body.positions.{index}.at: the fix is in the future; "
                    "check the device's clock",
                )
            accuracy = raw.get("accuracy_m")
            positions.append(
                NewPosition(
                    float(raw["lat"]),
                    float(raw["lon"]),
                    None if accuracy is None else float(accuracy),
                    at,
                )
            )
        device = call.user.user
        report = await self.ctx.database.run(
            report_positions_txn, device, positions, now, self._advance
        )
        for transition in report.transitions:
            await self.ctx.notices.send(
                report.guardians,
                f"fence.{transition.event}",
                fence=transition.fence,
                name=transition.name,
                device=device,
                lat=transition.lat,
                lon=transition.lon,
                at=transition.at,
            )
        return 200, {
            "accepted": report.accepted,
            "transitions": [transition_json(t) for t in report.transitions],
        }

    def _shape(self, fence: Fence) -> FenceShape:
        """Fences never change shape, so each shape is built (and validated) once.

        Keyed by the geometry itself, not the id: SQLite may give a deleted fence's
        id to the next one.
        """
        key = (fence.shape, json.dumps(fence.geometry, sort_keys=True))
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= 10_000:
                self._shapes.clear()
            shape = shape_of(fence, self.ctx.config.max_fence_points)
            self._shapes[key] = shape
        return shape

    def _advance(self, locked: list[Fence], positions: list[NewPosition]) -> list[FenceUpdate]:
        """Run in the report's transaction, on the database thread: pure computation."""
        margin = self.ctx.config.fence_margin
        confirmations = self.ctx.config.fence_confirmations
        updates = []
        for fence in locked:
            shape = self._shape(fence)
            usable = [p for p in positions if usable_accuracy(p.accuracy_m, shape)]
            if not usable:
                continue
            distances = shape.signed_distances([p.lat for p in usable], [p.lon for p in usable])
            track = FenceTrack(fence.state, fence.candidate, fence.candidate_count)
            changed_at = fence.state_changed_at
            transitions = []
            for position, distance in zip(usable, distances, strict=True):
                if not math.isfinite(distance):
                    continue
                moved = step(track, side_of(distance, margin), confirmations)
                track = moved.track
                if moved.confirmed:
                    changed_at = position.at
                if moved.event is not None:
                    transitions.append(
                        Transition(
                            fence.id,
                            fence.name,
                            moved.event,
                            position.lat,
                            position.lon,
                            position.at,
                        )
                    )
            if track != FenceTrack(fence.state, fence.candidate, fence.candidate_count):
                updates.append(
                    FenceUpdate(
                        fence.id,
                        track.state,
                        track.candidate,
                        track.candidate_count,
                        changed_at,
                        transitions,
                    )
                )
        return updates

    # --- history ------------------------------------------------------------------------

    async def list_locations(self, call: Call) -> Answer:
        query = call.query
        try:
            found = await self.ctx.database.run(
                positions_txn,
                str(call.params["device"]),
                call.user.user,
                query.get("since"),
                query.get("until"),
                int(query.get("limit", DEFAULT_LOCATIONS)),
            )
        except NotAGuardian:
            raise self._not_guardian() from None
        return 200, {"positions": [position_json(p) for p in found]}

    async def housekeeping(self) -> None:
        """Forget positions past ``location_retention``, a bounded batch per transaction."""
        before = self.ctx.now() - self.ctx.config.location_retention
        for _ in range(PURGE_BATCHES_PER_ROUND):
            removed = await self.ctx.database.run(purge_positions_txn, before, PURGE_BATCH)
            if removed < PURGE_BATCH:
                return
