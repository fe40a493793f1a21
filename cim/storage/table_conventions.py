"""What every table of cim shares: the one ``MetaData``, its constraint names, and
the column types and sizes more than one concern uses.

``cim.storage.schema`` gathers the tables (and says which conventions they follow);
the tables of one concern that no other table refers to are in a module of their
own (``file_tables``, ``logic_tables``, ``push_tables``), built on what is here.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Integer, MetaData, String

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

GROUP_ID_LENGTH = 26
"""16 random bytes in lowercase base32 without padding: opaque and unguessable."""

DEVICE_MAX = 64
"""The router's bound on a device name (cim.services.router.MAX_DEVICE_LENGTH)."""


def user_column(name: str, *, primary_key: bool = False) -> Column[str]:
    """A column naming an account: a row of it is deleted with the account."""
    return Column(
        name,
        String(USER_NAME_MAX),
        ForeignKey("users.name", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
    )
