"""cim.storage on PostgreSQL, and the scratch databases the PostgreSQL tests use.

scratch_postgresql_url creates a database on CIM_TEST_POSTGRESQL_URL (default: the local
server's ``test`` database) and drops it afterwards; it skips the test when the server is
unreachable, or fails it when CIM_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import os
import uuid

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from twisted.trial.unittest import SkipTest, TestCase

from cim.storage.accounts import list_users_txn
from cim.storage.database import (
    Database,
    DatabaseAhead,
    DatabaseBehind,
    DatabaseNotRunning,
    create_engine_for,
    current_revision,
    head_revision,
    upgrade,
    with_pinned_driver,
)
from tests.unit.test_storage import add_alice_txn, run_now, schema_differences, set_revision

POSTGRESQL_URL = os.environ.get(
    "CIM_TEST_POSTGRESQL_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def scratch_postgresql_url(test: TestCase) -> str:
    """A new, empty PostgreSQL database for this test, dropped at cleanup."""
    admin = create_engine(
        with_pinned_driver(POSTGRESQL_URL),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 3},
    )
    try:
        connection = admin.connect()
    except OperationalError as exc:
        admin.dispose()
        reason = f"PostgreSQL unreachable at {make_url(POSTGRESQL_URL)!r}: {exc.orig}"
        if os.environ.get("CIM_REQUIRE_SERVICES") == "1":
            test.fail(reason)
        raise SkipTest(reason) from None
    name = f"cim_test_{uuid.uuid4().hex[:16]}"
    connection.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.close()
        admin.dispose()

    test.addCleanup(drop)
    return make_url(POSTGRESQL_URL).set(database=name).render_as_string(hide_password=False)


class PostgresqlTests(TestCase):
    def test_start_on_empty_database_is_behind(self) -> None:
        url = scratch_postgresql_url(self)
        db = Database(url, None, runner=run_now)
        failure = self.failureResultOf(db.start(), DatabaseBehind)
        message = str(failure.value)
        self.assertIn("run `cimctl db upgrade`", message)
        self.assertIn(f"database is at revision none, the code needs {head_revision()}", message)
        self.failureResultOf(db.run(list_users_txn), DatabaseNotRunning)
        self.assertIsNone(current_revision(url))

    def test_upgraded_database_starts_and_runs(self) -> None:
        url = scratch_postgresql_url(self)
        self.assertEqual(upgrade(url), (None, head_revision()))
        self.assertEqual(current_revision(url), head_revision())
        db = Database(url, None, runner=run_now)
        self.successResultOf(db.start())
        self.addCleanup(db.stop)
        self.assertEqual(self.successResultOf(db.run(add_alice_txn)), 1)
        # The savepoint keeps the transaction usable after the unique violation.
        self.assertIsNone(self.successResultOf(db.run(add_alice_txn)))
        self.assertEqual([r.name for r in self.successResultOf(db.run(list_users_txn))], ["alice"])
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        self.assertEqual(schema_differences(engine), [])

    def test_unknown_revision_is_ahead(self) -> None:
        url = scratch_postgresql_url(self)
        upgrade(url)
        set_revision(url, "9999_from_the_future")
        self.failureResultOf(Database(url, None, runner=run_now).start(), DatabaseAhead)
        self.assertRaises(DatabaseAhead, upgrade, url)
