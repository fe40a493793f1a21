"""A migrated SQLite schema, made once per test process and copied into each test's database.

Migrating an empty SQLite database with Alembic costs about 0.2 s (every migration
script is loaded and run), and several hundred unit tests start a ``Database``. So the
first empty SQLite database a test opens is migrated for real (``prepare_schema``,
as the daemon does) into a template, and every later empty one receives a copy of
it through SQLite's backup API: the same tables, indexes and alembic revision the
migrations leave, in a few milliseconds. A database already at the head revision (a
file opened again, as ``cimctl`` does on every command) is left as it is, which is
all Alembic would do with it. Any other database (a test that set up an older or an
unknown revision) and every PostgreSQL database go through the real
``prepare_schema``, and so do the tests of the migrations themselves
(``real_migrations``).

The same process also opens SQLite without waiting for the disk (``PRAGMA
synchronous=OFF``): a unit test never outlives a crash of the machine, and a suite
of a few thousand commits otherwise spends much of its time in ``fsync``. Journal
mode (WAL), foreign keys and the busy timeout stay as the daemon sets them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from twisted.trial.unittest import SynchronousTestCase

from cim.storage import database as database_module

__all__ = ["install", "real_migrations"]

T = TypeVar("T")
_migrate = database_module.prepare_schema
_lock = threading.Lock()
_template: list[sqlite3.Connection] = []
_head_revision: list[str] = []


def _is_empty(connection: sqlite3.Connection) -> bool:
    return connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def _copy_of_template(engine: Engine) -> bool:
    """True when the template was copied into ``engine``'s empty database."""
    with _lock:
        if not _with_driver(engine, _is_empty):
            return False
        if not _template:
            _migrate(engine)  # the real migrations, once: this database is the template
            template = sqlite3.connect(":memory:", check_same_thread=False)
            _with_driver(engine, lambda driver: driver.backup(template))
            _template.append(template)
        else:
            _with_driver(engine, _template[0].backup)
        return True


def _with_driver(engine: Engine, use: Callable[[sqlite3.Connection], T]) -> T:
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        return use(driver)
    finally:
        raw.close()


def _at_head(engine: Engine) -> bool:
    with engine.connect() as connection:
        return database_module.revision_of(connection) == _head()


def _head() -> str:
    if not _head_revision:
        _head_revision.append(database_module.head_revision())
    return _head_revision[0]


def prepare_from_template(engine: Engine) -> None:
    """``prepare_schema`` for tests: an empty SQLite database gets the migrated template,
    and one already at the head revision is left as it is (Alembic would find nothing
    to do, after loading every migration script again)."""
    if engine.dialect.name == "sqlite" and (_copy_of_template(engine) or _at_head(engine)):
        return
    _migrate(engine)


def _unsynced(driver: object, record: object) -> None:
    if isinstance(driver, sqlite3.Connection):
        driver.execute("PRAGMA synchronous=OFF")


def install() -> None:
    """From now on, in this process, Database and cimctl prepare SQLite from the
    template, and SQLite connections do not wait for the disk."""
    database_module.prepare_schema = prepare_from_template
    if not event.contains(Engine, "connect", _unsynced):
        event.listen(Engine, "connect", _unsynced)


def real_migrations(test: SynchronousTestCase) -> None:
    """For the rest of ``test``: every database is migrated by Alembic, as in production."""
    test.patch(database_module, "prepare_schema", _migrate)
