"""Every table cim keeps, as SQLAlchemy Core ``Table`` objects on one ``MetaData``.

This module is the reference the migrations must reproduce: ``tests.test_storage``
compares a freshly migrated database with ``metadata`` and fails on any difference, so
a new table needs both a ``Table`` here and a migration in ``migrations/versions``.

Conventions every table follows, so SQLite and PostgreSQL behave the same:

- times are seconds since the epoch as a double (like ``SessionRecord.created_at``),
  never a ``DateTime``: SQLite would drop the time zone;
- identifiers that may outgrow 2**31 use ``BIG_ID``;
- constraints get names from ``NAMING_CONVENTION``, because Alembic can only alter or
  drop a constraint it can name, and SQLite batch migrations need the names too.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Double,
    Integer,
    MetaData,
    String,
    Table,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

BIG_ID = BigInteger().with_variant(Integer(), "sqlite")
"""A 64-bit key on PostgreSQL that still autoincrements on SQLite.

SQLite only autoincrements an ``INTEGER PRIMARY KEY`` (the rowid, already 64-bit);
a ``BIGINT`` primary key there would need explicit values.
"""

USER_NAME_MAX = 64
USER_KINDS = ("person", "device")

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Case-sensitive on both engines: SQLite's default BINARY collation and
    # PostgreSQL's text comparison both tell "Alice" from "alice".
    Column("name", String(USER_NAME_MAX), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("kind", String(16), nullable=False, server_default="person"),
    Column("created_at", Double, nullable=False),
    CheckConstraint("kind IN ('person', 'device')", name="kind"),
)
