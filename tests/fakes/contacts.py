"""Contacts made directly in the database, for tests that are about something else.

Groups are joined with consent (docs/privacy.md): a contact whose ``group_adds`` is
``contacts`` (the default) is added at once, anyone else is invited. Tests of group
management make their users contacts first, so adding means adding; the consent
rules themselves are tested in tests/unit/test_contacts*.py.
"""

from __future__ import annotations

from itertools import permutations

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from cim.storage.schema import contacts

__all__ = ["befriend_txn"]


def befriend_txn(connection: Connection, *names: str, at: float = 1.0) -> None:
    """Every two of ``names`` become contacts of each other (existing pairs stay)."""
    present = set(
        connection.execute(
            select(contacts.c.user_name, contacts.c.contact).where(contacts.c.user_name.in_(names))
        ).tuples()
    )
    rows = [
        {"user_name": first, "contact": second, "created_at": at, "approved_by": None}
        for first, second in permutations(dict.fromkeys(names), 2)
        if (first, second) not in present
    ]
    if rows:
        connection.execute(insert(contacts), rows)
