"""Transactions on SOS alarms (``sos_events``).

Raising an alarm and reading whom to tell happen in one transaction, and so do
acknowledging one and checking that the acknowledger is still an active guardian, so
a guardian unbound a moment earlier is neither told nor able to handle it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Row

from cim.storage.bindings import ACTIVE, active_guardians_txn, is_active_guardian_txn
from cim.storage.schema import bindings, sos_events

__all__ = [
    "AckOutcome",
    "SosEvent",
    "acknowledge_sos_txn",
    "guarded_devices_txn",
    "list_sos_txn",
    "raise_sos_txn",
    "sos_event_txn",
]


@dataclass(frozen=True)
class SosEvent:
    id: int
    device: str
    lat: float
    lon: float
    accuracy_m: float | None
    battery: int | None
    raised_at: float
    handled_by: str | None
    handled_at: float | None


def _event(row: Row[Any]) -> SosEvent:
    return SosEvent(
        int(row.id),
        str(row.device),
        float(row.lat),
        float(row.lon),
        None if row.accuracy_m is None else float(row.accuracy_m),
        None if row.battery is None else int(row.battery),
        float(row.raised_at),
        None if row.handled_by is None else str(row.handled_by),
        None if row.handled_at is None else float(row.handled_at),
    )


def sos_event_txn(connection: Connection, event_id: int) -> SosEvent | None:
    row = connection.execute(select(sos_events).where(sos_events.c.id == event_id)).first()
    return None if row is None else _event(row)


def raise_sos_txn(
    connection: Connection,
    device: str,
    lat: float,
    lon: float,
    accuracy_m: float | None,
    battery: int | None,
    now: float,
) -> tuple[SosEvent, list[str]]:
    """Store the alarm; returns it with the guardians active at that moment."""
    result = connection.execute(
        insert(sos_events).values(
            device=device,
            lat=lat,
            lon=lon,
            accuracy_m=accuracy_m,
            battery=battery,
            raised_at=now,
            handled_by=None,
            handled_at=None,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    event = sos_event_txn(connection, int(key[0]))
    assert event is not None
    return event, active_guardians_txn(connection, device)


def guarded_devices_txn(connection: Connection, guardian: str) -> list[str]:
    rows = connection.execute(
        select(bindings.c.device).where(
            bindings.c.guardian == guardian, bindings.c.status == ACTIVE
        )
    )
    return sorted(str(name) for name in rows.scalars())


def list_sos_txn(connection: Connection, devices: Sequence[str], limit: int) -> list[SosEvent]:
    """The newest alarms of ``devices``, newest first."""
    if not devices:
        return []
    rows = connection.execute(
        select(sos_events)
        .where(sos_events.c.device.in_(list(devices)))
        .order_by(sos_events.c.raised_at.desc(), sos_events.c.id.desc())
        .limit(limit)
    )
    return [_event(row) for row in rows]


@dataclass(frozen=True)
class AckOutcome:
    event: SosEvent
    first: bool
    """True when this acknowledgement is the one that handled the alarm."""
    guardians: list[str]
    """The device's active guardians when it was handled."""


def acknowledge_sos_txn(
    connection: Connection, event_id: int, guardian: str, now: float
) -> AckOutcome | None:
    """Mark the alarm handled by ``guardian`` unless someone already did.

    The UPDATE only matches while ``handled_by`` is NULL, so of two simultaneous
    acknowledgements exactly one changes the row and is told it won. None when the
    event does not exist or ``guardian`` is not (any longer) an active guardian of its
    device; the caller tells those apart with ``sos_event_txn``.
    """
    event = sos_event_txn(connection, event_id)
    if event is None or not is_active_guardian_txn(connection, event.device, guardian):
        return None
    changed = connection.execute(
        update(sos_events)
        .where(sos_events.c.id == event_id, sos_events.c.handled_by.is_(None))
        .values(handled_by=guardian, handled_at=now)
    )
    current = sos_event_txn(connection, event_id)
    assert current is not None
    return AckOutcome(
        current, changed.rowcount == 1, active_guardians_txn(connection, event.device)
    )
