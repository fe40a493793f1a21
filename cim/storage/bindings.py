"""Transactions on device bindings (``bindings``, ``binding_codes``).

Who is bound to whom decides most authorization in the logic service: a guardian
reads a device's positions, defines its fences and hears its SOS only through an
active binding, so these reads are shared by every feature.
"""

from __future__ import annotations

from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Connection

from cim.storage.schema import bindings

ACTIVE = "active"
PENDING = "pending"


def active_guardians_txn(connection: Connection, device: str) -> list[str]:
    """The device's guardians whose binding is active, by name."""
    rows = connection.execute(
        select(bindings.c.guardian)
        .where(bindings.c.device == device, bindings.c.status == ACTIVE)
        .order_by(bindings.c.guardian)
    )
    return [str(name) for name in rows.scalars()]


def is_active_guardian_txn(connection: Connection, device: str, guardian: str) -> bool:
    row = connection.execute(
        select(bindings.c.status).where(
            bindings.c.device == device,
            bindings.c.guardian == guardian,
            bindings.c.status == ACTIVE,
        )
    ).first()
    return row is not None


def bound_accounts_txn(connection: Connection, user: str) -> list[str]:
    """Everyone ``user`` shares an active binding with, from either side.

    A person's devices and a device's guardians; "family" posts are visible to them.
    """
    rows = connection.execute(
        select(bindings.c.device, bindings.c.guardian).where(
            bindings.c.status == ACTIVE,
            or_(bindings.c.device == user, bindings.c.guardian == user),
        )
    )
    names = {row.guardian if row.device == user else row.device for row in rows}
    return sorted(names)


def shares_binding_txn(connection: Connection, first: str, second: str) -> bool:
    row = connection.execute(
        select(bindings.c.device).where(
            bindings.c.status == ACTIVE,
            or_(
                and_(bindings.c.device == first, bindings.c.guardian == second),
                and_(bindings.c.device == second, bindings.c.guardian == first),
            ),
        )
    ).first()
    return row is not None
