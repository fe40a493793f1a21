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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cim.logic.context import Caller, LogicContext
from cim.logic.errors import BadInput, Conflict, Forbidden, NotFound
from cim.logic.geometry import (
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
    Report,
    TooManyFences,
    Transition,
    create_fence_txn,
    delete_fence_txn,
    list_fences_txn,
    positions_txn,
    purge_positions_txn,
    report_positions_txn,
)

__all__ = ["Fences", "Fix"]

MAX_CLOCK_SKEW = 300.0
"""A fix from further in the future than this is a wrong clock: refused, because it
would make every real position after it look stale."""
PURGE_BATCH = 1000
PURGE_BATCHES_PER_ROUND = 100


@dataclass(frozen=True)
class Fix:
    """A position as the device reports it; ``at`` None means "now"."""

    lat: float
    lon: float
    accuracy_m: float | None
    at: float | None


def shape_of(fence: Fence, max_points: int) -> FenceShape:
    geometry = fence.geometry
    if fence.shape == "circle":
        return circle_fence(geometry["lat"], geometry["lon"], geometry["radius_m"])
    # A fence stored under a larger max_fence_points stays usable after it is lowered.
    return polygon_fence(geometry["points"], max(max_points, len(geometry["points"])))


def _not_guardian() -> Forbidden:
    return Forbidden("not_a_guardian", "only the device's active guardians may do this")


class Fences:
    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx
        self._shapes: dict[tuple[str, str], FenceShape] = {}

    # --- fences -------------------------------------------------------------------------

    async def create_fence(
        self,
        guardian: str,
        device: str,
        name: str,
        circle: Mapping[str, Any] | None,
        polygon: Sequence[Sequence[float]] | None,
    ) -> Fence:
        """A circle or (when ``circle`` is None) a polygon fence for ``device``."""
        config = self.ctx.config
        geometry: dict[str, Any]
        try:
            if circle is not None:
                geometry = {
                    "lat": float(circle["lat"]),
                    "lon": float(circle["lon"]),
                    "radius_m": float(circle["radius_m"]),
                }
                circle_fence(geometry["lat"], geometry["lon"], geometry["radius_m"])
                shape = "circle"
            else:
                points = [[float(p[0]), float(p[1])] for p in polygon or ()]
                if len(points) > 1 and points[0] == points[-1]:
                    points.pop()
                polygon_fence(points, config.max_fence_points)
                geometry = {"points": points}
                shape = "polygon"
        except InvalidFence as exc:
            raise BadInput("invalid_fence", str(exc)) from None
        try:
            return await self.ctx.database.run(
                create_fence_txn,
                device,
                guardian,
                name,
                shape,
                geometry,
                self.ctx.now(),
                config.max_fences_per_device,
            )
        except NotAGuardian:
            raise _not_guardian() from None
        except TooManyFences:
            raise Conflict(
                "too_many_fences",
                f"a device may have at most {config.max_fences_per_device} fences",
            ) from None

    async def fences_of(self, guardian: str, device: str) -> list[Fence]:
        try:
            return list(await self.ctx.database.run(list_fences_txn, device, guardian))
        except NotAGuardian:
            raise _not_guardian() from None

    async def delete_fence(self, guardian: str, device: str, fence_id: int) -> None:
        try:
            deleted = await self.ctx.database.run(delete_fence_txn, device, guardian, fence_id)
        except NotAGuardian:
            raise _not_guardian() from None
        if not deleted:
            raise NotFound("not_found", "the device has no such fence")

    # --- positions ----------------------------------------------------------------------

    async def report_positions(self, caller: Caller, fixes: Sequence[Fix]) -> Report:
        """Store the device's fixes, move its fences and announce the crossings."""
        if not caller.is_device:
            raise Forbidden("devices_only", "only a device reports its own positions")
        now = self.ctx.now()
        positions = []
        for index, fix in enumerate(fixes):
            at = now if fix.at is None else fix.at
            if at > now + MAX_CLOCK_SKEW:
                raise BadInput(
                    "bad_request",
                    f"body.positions.{index}.at: the fix is in the future; "
                    "check the device's clock",
                )
            positions.append(NewPosition(fix.lat, fix.lon, fix.accuracy_m, at))
        device = caller.user
        report: Report = await self.ctx.database.run(
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
        return report

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

    async def positions(
        self,
        reader: str,
        device: str,
        since: float | None,
        until: float | None,
        limit: int,
    ) -> list[Position]:
        """The device's positions, newest first, for the device or an active guardian."""
        try:
            return list(
                await self.ctx.database.run(positions_txn, device, reader, since, until, limit)
            )
        except NotAGuardian:
            raise _not_guardian() from None

    async def housekeeping(self) -> None:
        """Forget positions past ``location_retention``, a bounded batch per transaction."""
        before = self.ctx.now() - self.ctx.config.location_retention
        for _ in range(PURGE_BATCHES_PER_ROUND):
            removed = await self.ctx.database.run(purge_positions_txn, before, PURGE_BATCH)
            if removed < PURGE_BATCH:
                return
