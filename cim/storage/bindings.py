"""Transactions on device bindings (``bindings``, ``binding_codes``).

Who is bound to whom decides most authorization in the logic service: a guardian
reads a device's positions, defines its fences and hears its SOS only through an
active binding, so these reads are shared by every feature.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from cim.storage.schema import binding_codes, bindings, users

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


# --- binding codes and the bindings' life cycle ------------------------------------------


@dataclass(frozen=True)
class Binding:
    device: str
    guardian: str
    status: str
    created_at: float
    approved_by: str | None
    approved_at: float | None


def _binding(row: Row[Any]) -> Binding:
    return Binding(
        str(row.device),
        str(row.guardian),
        str(row.status),
        float(row.created_at),
        None if row.approved_by is None else str(row.approved_by),
        None if row.approved_at is None else float(row.approved_at),
    )


def binding_txn(connection: Connection, device: str, guardian: str) -> Binding | None:
    row = connection.execute(
        select(bindings).where(bindings.c.device == device, bindings.c.guardian == guardian)
    ).first()
    return None if row is None else _binding(row)


def first_guardian_txn(connection: Connection, device: str) -> str | None:
    """The guardian who has been active longest; they approve later requests.

    Ordered by when each binding became active (an immediate first binding is
    approved at its creation), so when the first guardian leaves, the next one to
    have been let in takes over without anything being rewritten.
    """
    row = connection.execute(
        select(bindings.c.guardian)
        .where(bindings.c.device == device, bindings.c.status == ACTIVE)
        .order_by(
            func.coalesce(bindings.c.approved_at, bindings.c.created_at),
            bindings.c.created_at,
            bindings.c.guardian,
        )
        .limit(1)
    ).first()
    return None if row is None else str(row.guardian)


def account_kind_txn(connection: Connection, name: str) -> str | None:
    """``person`` or ``device``; None when there is no such account."""
    row = connection.execute(select(users.c.kind).where(users.c.name == name)).first()
    return None if row is None else str(row.kind)


def store_binding_code_txn(
    connection: Connection, device: str, code_hash: str, expires_at: float, now: float
) -> None:
    """The device's one live code: asking again replaces (and so revokes) the last one.

    An upsert, not DELETE then INSERT: two requests at once would both find no row to
    delete and the second INSERT would break the primary key.
    """
    values = {"code_hash": code_hash, "expires_at": expires_at, "created_at": now}
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(binding_codes).values(device=device, **values)
    connection.execute(
        statement.on_conflict_do_update(index_elements=[binding_codes.c.device], set_=values)
    )


class BindResult(enum.Enum):
    CREATED = "created"
    EXISTS = "exists"
    WRONG_CODE = "wrong_code"
    EXPIRED_CODE = "expired_code"
    NO_DEVICE = "no_device"


@dataclass(frozen=True)
class BindOutcome:
    result: BindResult
    binding: Binding | None = None
    first_guardian: str | None = None
    """Who must approve a pending binding (None when it became active at once)."""


def bind_with_code_txn(
    connection: Connection, device: str, guardian: str, code_hash: str, now: float
) -> BindOutcome:
    """Bind ``guardian`` to ``device`` if ``code_hash`` is the device's live code.

    An existing binding (active or pending) is returned as it is, before any code is
    looked at, so a retried request whose first answer was lost gets the same
    binding rather than a wrong-code refusal for the code it already consumed. The
    code is consumed by a DELETE that names its hash: of two people racing with the
    same code, only the one whose DELETE removed the row binds.
    """
    if account_kind_txn(connection, device) != "device":
        return BindOutcome(BindResult.NO_DEVICE)
    existing = binding_txn(connection, device, guardian)
    if existing is not None:
        return BindOutcome(BindResult.EXISTS, existing)
    row = connection.execute(
        select(binding_codes.c.code_hash, binding_codes.c.expires_at).where(
            binding_codes.c.device == device
        )
    ).first()
    if row is None or not hmac.compare_digest(str(row.code_hash), code_hash):
        return BindOutcome(BindResult.WRONG_CODE)
    if float(row.expires_at) <= now:
        connection.execute(delete(binding_codes).where(binding_codes.c.device == device))
        return BindOutcome(BindResult.EXPIRED_CODE)
    consumed = connection.execute(
        delete(binding_codes).where(
            binding_codes.c.device == device, binding_codes.c.code_hash == code_hash
        )
    )
    if consumed.rowcount != 1:
        # Someone else consumed it first. When that was this same person's earlier try
        # (a retry sent before the first answer came back), it has committed its
        # binding by now: answer with it rather than count a wrong code.
        existing = binding_txn(connection, device, guardian)
        if existing is not None:
            return BindOutcome(BindResult.EXISTS, existing)
        return BindOutcome(BindResult.WRONG_CODE)
    first = first_guardian_txn(connection, device)
    status = ACTIVE if first is None else PENDING
    connection.execute(
        insert(bindings).values(
            device=device,
            guardian=guardian,
            status=status,
            created_at=now,
            approved_by=None,
            approved_at=now if status == ACTIVE else None,
        )
    )
    binding = binding_txn(connection, device, guardian)
    return BindOutcome(BindResult.CREATED, binding, first)


@dataclass(frozen=True)
class BindingChange:
    allowed: bool
    """False: the caller may not make this change (nothing was read beyond that)."""
    binding: Binding | None = None
    """The binding as it is now (approval) or as it was (removal); None: no such one."""
    changed: bool = False


def approve_binding_txn(
    connection: Connection, device: str, guardian: str, approver: str, now: float
) -> BindingChange:
    """Make a pending binding active if ``approver`` is the device's first guardian.

    Who is first is read in the same transaction as the change, so a guardian unbound
    a moment ago cannot approve. The UPDATE is conditional on the row still being
    pending, so two approvals race harmlessly and only one reports a change.
    """
    if first_guardian_txn(connection, device) != approver:
        return BindingChange(False)
    changed = connection.execute(
        update(bindings)
        .where(
            bindings.c.device == device,
            bindings.c.guardian == guardian,
            bindings.c.status == PENDING,
        )
        .values(status=ACTIVE, approved_by=approver, approved_at=now)
    )
    binding = binding_txn(connection, device, guardian)
    return BindingChange(True, binding, changed.rowcount == 1)


def remove_binding_txn(
    connection: Connection, device: str, guardian: str, remover: str
) -> BindingChange:
    """Delete the binding if ``remover`` is the device, that guardian or the first guardian."""
    allowed = remover in (device, guardian) or first_guardian_txn(connection, device) == remover
    if not allowed:
        return BindingChange(False)
    binding = binding_txn(connection, device, guardian)
    if binding is None:
        return BindingChange(True)
    removed = connection.execute(
        delete(bindings).where(bindings.c.device == device, bindings.c.guardian == guardian)
    )
    return BindingChange(True, binding, removed.rowcount == 1)


def bindings_of_txn(connection: Connection, user: str) -> list[Binding]:
    """The rows ``user`` is a side of, plus pending requests it is first guardian for."""
    rows = connection.execute(
        select(bindings).where(or_(bindings.c.device == user, bindings.c.guardian == user))
    ).all()
    found = {(str(row.device), str(row.guardian)): _binding(row) for row in rows}
    guarded = sorted(
        {b.device for b in found.values() if b.guardian == user and b.status == ACTIVE}
    )
    for device in guarded:
        if first_guardian_txn(connection, device) != user:
            continue
        pending = connection.execute(
            select(bindings).where(bindings.c.device == device, bindings.c.status == PENDING)
        )
        for row in pending:
            found[(str(row.device), str(row.guardian))] = _binding(row)
    return sorted(found.values(), key=lambda b: (b.device, b.created_at, b.guardian))


def purge_binding_codes_txn(connection: Connection, now: float) -> int:
    """Forget expired codes (they can only ever be refused); returns how many went."""
    result = connection.execute(delete(binding_codes).where(binding_codes.c.expires_at <= now))
    return int(result.rowcount or 0)
