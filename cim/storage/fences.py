"""Transactions on geofences (``fences``) and reported positions (``locations``).

Every read and change checks the binding in the same transaction, so a guardian
who is unbound loses access with the next call, not after some cache expires. A
report locks the device's fence rows before it reads or moves their hysteresis
state: two reports from one device arriving together are then taken one after the
other and cannot both announce the same crossing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Row

from cim.storage.bindings import active_guardians_txn, is_active_guardian_txn
from cim.storage.schema import fences, locations, users

__all__ = [
    "Fence",
    "FenceUpdate",
    "NewPosition",
    "NotAGuardian",
    "Position",
    "Report",
    "TooManyFences",
    "Transition",
    "create_fence_txn",
    "delete_fence_txn",
    "list_fences_txn",
    "positions_txn",
    "purge_positions_txn",
    "report_positions_txn",
]


class NotAGuardian(Exception):
    """The caller has no active binding to the device (or the device does not exist)."""


class TooManyFences(Exception):
    pass


@dataclass(frozen=True)
class Fence:
    id: int
    device: str
    name: str
    shape: str
    geometry: dict[str, Any]
    created_by: str
    created_at: float
    state: str
    candidate: str | None
    candidate_count: int
    state_changed_at: float | None


@dataclass(frozen=True)
class NewPosition:
    lat: float
    lon: float
    accuracy_m: float | None
    at: float


@dataclass(frozen=True)
class Position:
    id: int
    lat: float
    lon: float
    accuracy_m: float | None
    at: float
    received_at: float


@dataclass(frozen=True)
class Transition:
    fence: int
    name: str
    event: str
    lat: float
    lon: float
    at: float


@dataclass(frozen=True)
class FenceUpdate:
    """A fence's hysteresis state after a report, and what it announces."""

    fence: int
    state: str
    candidate: str | None
    candidate_count: int
    state_changed_at: float | None
    transitions: list[Transition]


@dataclass(frozen=True)
class Report:
    accepted: int
    transitions: list[Transition]
    guardians: list[str]
    """Whom to tell, read in the same transaction (empty when nothing crossed)."""


FenceAdvance = Callable[[list[Fence], list[NewPosition]], list[FenceUpdate]]
"""Pure logic run inside the report's transaction: the locked fences and the
positions that may move them, in time order, to the fences' new states."""


def _fence(row: Row[Any]) -> Fence:
    return Fence(
        int(row.id),
        row.device,
        row.name,
        row.shape,
        json.loads(row.geometry),
        row.created_by,
        float(row.created_at),
        row.state,
        row.candidate,
        int(row.candidate_count),
        None if row.state_changed_at is None else float(row.state_changed_at),
    )


def _require_guardian(connection: Connection, device: str, guardian: str) -> None:
    if not is_active_guardian_txn(connection, device, guardian):
        raise NotAGuardian(device)


def create_fence_txn(
    connection: Connection,
    device: str,
    guardian: str,
    name: str,
    shape: str,
    geometry: dict[str, Any],
    now: float,
    max_fences: int,
) -> Fence:
    _require_guardian(connection, device, guardian)
    # The device's account row serialises fence creation per device, so two requests
    # at once cannot both count one fence short of the limit. FOR NO KEY UPDATE does
    # not hold up the device's position reports (their foreign key only shares it).
    connection.execute(
        select(users.c.id).where(users.c.name == device).with_for_update(key_share=True)
    )
    count = connection.execute(
        select(func.count()).select_from(fences).where(fences.c.device == device)
    ).scalar_one()
    if count >= max_fences:
        raise TooManyFences(device)
    fence_id = connection.execute(
        insert(fences)
        .values(
            device=device,
            name=name,
            shape=shape,
            geometry=json.dumps(geometry, separators=(",", ":")),
            created_by=guardian,
            created_at=now,
            state="unknown",
            candidate_count=0,
        )
        .returning(fences.c.id)
    ).scalar_one()
    row = connection.execute(select(fences).where(fences.c.id == fence_id)).one()
    return _fence(row)


def list_fences_txn(connection: Connection, device: str, guardian: str) -> list[Fence]:
    _require_guardian(connection, device, guardian)
    rows = connection.execute(select(fences).where(fences.c.device == device).order_by(fences.c.id))
    return [_fence(row) for row in rows]


def delete_fence_txn(connection: Connection, device: str, guardian: str, fence_id: int) -> bool:
    """False when the device has no such fence (another device's fence included)."""
    _require_guardian(connection, device, guardian)
    result = connection.execute(
        delete(fences).where(fences.c.id == fence_id, fences.c.device == device)
    )
    return bool(result.rowcount)


def positions_txn(
    connection: Connection,
    device: str,
    reader: str,
    since: float | None,
    until: float | None,
    limit: int,
) -> list[Position]:
    """The device's positions, newest first; the device itself or an active guardian."""
    if reader != device:
        _require_guardian(connection, device, reader)
    query = select(locations).where(locations.c.device == device)
    if since is not None:
        query = query.where(locations.c.recorded_at >= since)
    if until is not None:
        query = query.where(locations.c.recorded_at <= until)
    rows = connection.execute(
        query.order_by(locations.c.recorded_at.desc(), locations.c.id.desc()).limit(limit)
    )
    return [
        Position(
            int(row.id),
            float(row.lat),
            float(row.lon),
            None if row.accuracy_m is None else float(row.accuracy_m),
            float(row.recorded_at),
            float(row.received_at),
        )
        for row in rows
    ]


def report_positions_txn(
    connection: Connection,
    device: str,
    positions: Sequence[NewPosition],
    received_at: float,
    advance: FenceAdvance,
) -> Report:
    """Store the positions and move the device's fences, all in one transaction.

    Positions older than the newest one the device had already reported are stored
    (they are history) but do not move fences: the fences have already moved past
    that moment, and replaying it would announce a crossing out of order. Nor does a
    repeat of the newest one (same time and place).
    """
    ordered = sorted(positions, key=lambda p: p.at)
    locked = [
        _fence(row)
        for row in connection.execute(
            select(fences).where(fences.c.device == device).order_by(fences.c.id).with_for_update()
        )
    ]
    newest = connection.execute(
        select(func.max(locations.c.recorded_at)).where(locations.c.device == device)
    ).scalar()
    # A retried report (its first answer lost) repeats fixes already placed: one at
    # exactly the newest time and place must not count twice toward a crossing.
    seen_at_newest: set[tuple[float, float]] = set()
    if newest is not None:
        seen_at_newest = {
            (float(row.lat), float(row.lon))
            for row in connection.execute(
                select(locations.c.lat, locations.c.lon).where(
                    locations.c.device == device, locations.c.recorded_at == newest
                )
            )
        }
    if ordered:
        connection.execute(
            insert(locations),
            [
                {
                    "device": device,
                    "lat": p.lat,
                    "lon": p.lon,
                    "accuracy_m": p.accuracy_m,
                    "recorded_at": p.at,
                    "received_at": received_at,
                }
                for p in ordered
            ],
        )
    usable = [
        p
        for p in ordered
        if newest is None
        or p.at > float(newest)
        or (p.at == float(newest) and (p.lat, p.lon) not in seen_at_newest)
    ]
    transitions: list[Transition] = []
    if locked and usable:
        for change in advance(locked, usable):
            connection.execute(
                update(fences)
                .where(fences.c.id == change.fence)
                .values(
                    state=change.state,
                    candidate=change.candidate,
                    candidate_count=change.candidate_count,
                    state_changed_at=change.state_changed_at,
                )
            )
            transitions.extend(change.transitions)
    transitions.sort(key=lambda t: (t.at, t.fence))
    guardians = active_guardians_txn(connection, device) if transitions else []
    return Report(len(ordered), transitions, guardians)


def purge_positions_txn(connection: Connection, before: float, batch: int) -> int:
    """Delete up to ``batch`` positions recorded before ``before``; returns how many."""
    doomed = (
        select(locations.c.id)
        .where(locations.c.recorded_at < before)
        .order_by(locations.c.recorded_at)
        .limit(batch)
    )
    ids = [int(i) for i in connection.execute(doomed).scalars()]
    if not ids:
        return 0
    connection.execute(delete(locations).where(locations.c.id.in_(ids)))
    return len(ids)
