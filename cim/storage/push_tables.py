"""The push service's table (cim.push): each device's registration with its
provider. Gathered by ``cim.storage.schema``."""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Double,
    String,
    Table,
)

from cim.storage.table_conventions import (
    DEVICE_MAX,
    metadata,
    user_column,
)

__all__ = [
    "PUSH_APP_MAX",
    "PUSH_LOCALE_MAX",
    "PUSH_PROVIDER_NAMES",
    "PUSH_TOKEN_MAX",
    "push_registrations",
]

# --- push registrations (cim.push) -----------------------------------------------------

PUSH_PROVIDER_NAMES = ("fcm", "apns", "webhook")
PUSH_TOKEN_MAX = 4096
PUSH_APP_MAX = 255
PUSH_LOCALE_MAX = 35

push_registrations = Table(
    "push_registrations",
    metadata,
    # One registration per (user, device): a device registers again to replace its
    # token. Deleting the account takes its registrations with it.
    user_column("user_name", primary_key=True),
    Column("device", String(DEVICE_MAX), primary_key=True),
    Column("provider", String(16), nullable=False),
    Column("token", String(PUSH_TOKEN_MAX), nullable=False),
    Column("app", String(PUSH_APP_MAX), nullable=True),
    Column("locale", String(PUSH_LOCALE_MAX), nullable=True),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    CheckConstraint("provider IN ('fcm', 'apns', 'webhook')", name="provider"),
)
