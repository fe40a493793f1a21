"""cim.storage: migrations, the Database's transactions and its stop, SQLite and PostgreSQL.

Most tests hand Database a synchronous runner, so no reactor and no threads are
involved. One test drives the real "cim-db" pool through a fake reactor that runs
the thread's callbacks when the test asks for them.

The PostgreSQL tests create a scratch database on CIM_TEST_POSTGRESQL_URL (default:
the local server's ``test`` database) and drop it afterwards. They are skipped when
the server is unreachable, unless CIM_REQUIRE_SERVICES=1, when they fail instead.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection, Engine, make_url
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import TestCase

from cim.storage.accounts import insert_user_txn, list_users_txn, user_exists_txn
from cim.storage.database import (
    Database,
    DatabaseAhead,
    DatabaseNotRunning,
    create_engine_for,
    current_revision,
    head_revision,
    upgrade,
)
from cim.storage.schema import metadata, users
from tests.fakes.schema import prepare_from_template, real_migrations
from tests.fakes.timelines import run_now

T = TypeVar("T")


class QueuedRunner:
    """A runner that holds work until the test releases it, like a busy pool."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.queued.append((work, d))
        return d

    def run_all(self) -> None:
        while self.queued:
            work, d = self.queued.pop(0)
            maybeDeferred(work).chainDeferred(d)


class ThreadHopReactor:
    """Just enough reactor for deferToThreadPool: callbacks wait in a queue for the test."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]
        self.calls = queue.Queue()
        self.triggers: dict[object, tuple[str, str, Callable[..., Any]]] = {}

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.put((f, args, kwargs))

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[..., Any]) -> object:
        handle = object()
        self.triggers[handle] = (phase, event, f)
        return handle

    def removeSystemEventTrigger(self, handle: object) -> None:
        del self.triggers[handle]

    def wait_for(self, d: Deferred[T]) -> None:
        """Run the pool's callbacks until d has fired (a blocking wait, not a sleep)."""
        while not d.called:
            f, args, kwargs = self.calls.get(timeout=30)
            f(*args, **kwargs)


def sqlite_url(test: TestCase, *parts: str) -> str:
    return "sqlite:///" + os.path.join(os.path.abspath(test.mktemp()), *parts, "cim.db")


def schema_differences(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))


def add_alice_txn(connection: Connection) -> int | None:
    return insert_user_txn(connection, "alice", "scrypt$hash", "person", 1.5)


def set_revision(url: str, revision: str) -> None:
    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{revision}'")
    finally:
        engine.dispose()


class MigrationTests(TestCase):
    def setUp(self) -> None:
        real_migrations(self)

    def test_upgrade_creates_the_tables(self) -> None:
        url = sqlite_url(self, "data")
        self.assertIsNone(current_revision(url))
        self.assertEqual(upgrade(url), (None, head_revision()))
        self.assertEqual(current_revision(url), head_revision())
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        tables = set(inspect(engine).get_table_names())
        self.assertLessEqual({"users", "alembic_version"}, tables)
        columns = {c["name"] for c in inspect(engine).get_columns("users")}
        self.assertEqual(
            columns,
            {
                "id",
                "name",
                "password_hash",
                "kind",
                "created_at",
                "message_policy",
                "group_adds",
                "read_receipts",
            },
        )

    def test_upgrade_twice_changes_nothing(self) -> None:
        url = sqlite_url(self)
        upgrade(url)
        self.assertEqual(upgrade(url), (head_revision(), head_revision()))

    def test_migrations_match_schema_module(self) -> None:
        """A Table added to schema.py without a migration (or the reverse) fails here."""
        url = sqlite_url(self)
        upgrade(url)
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        self.assertEqual(schema_differences(engine), [])

    def test_current_revision_does_not_create_the_file(self) -> None:
        url = sqlite_url(self, "absent")
        self.assertIsNone(current_revision(url))
        database = make_url(url).database
        assert database is not None
        self.assertFalse(os.path.exists(os.path.dirname(database)))

    def test_sqlite_runs_in_wal_mode_with_foreign_keys(self) -> None:
        url = sqlite_url(self)
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        with engine.begin() as connection:
            self.assertEqual(connection.exec_driver_sql("PRAGMA journal_mode").scalar(), "wal")
            self.assertEqual(connection.exec_driver_sql("PRAGMA foreign_keys").scalar(), 1)

    def test_in_memory_sqlite_migrates_on_its_own_engine(self) -> None:
        db = Database("sqlite://", None, runner=run_now)
        self.successResultOf(db.start())
        self.assertEqual(self.successResultOf(db.run(add_alice_txn)), 1)
        self.successResultOf(db.stop())


class DatabaseTests(TestCase):
    def setUp(self) -> None:
        real_migrations(self)

    def start(self, url: str, runner: Any = run_now) -> Database:
        db = Database(url, None, runner=runner)
        self.successResultOf(db.start())
        self.addCleanup(db.stop)
        return db

    def test_start_creates_data_dir_and_migrates_sqlite(self) -> None:
        url = sqlite_url(self, "not", "yet")
        self.start(url)
        database = make_url(url).database
        assert database is not None
        self.assertTrue(os.path.exists(database))
        self.assertEqual(current_revision(url), head_revision())

    def test_start_refuses_unknown_revision(self) -> None:
        url = sqlite_url(self)
        upgrade(url)
        set_revision(url, "9999_from_the_future")
        db = Database(url, None, runner=run_now)
        failure = self.failureResultOf(db.start(), DatabaseAhead)
        self.assertIn("9999_from_the_future", str(failure.value))
        self.failureResultOf(db.run(add_alice_txn), DatabaseNotRunning)

    def test_run_returns_plain_data(self) -> None:
        db = self.start(sqlite_url(self))
        self.assertEqual(self.successResultOf(db.run(add_alice_txn)), 1)
        records = self.successResultOf(db.run(list_users_txn))
        self.assertEqual(
            [(r.name, r.kind, r.created_at) for r in records], [("alice", "person", 1.5)]
        )
        self.assertTrue(self.successResultOf(db.run(user_exists_txn, name="alice")))

    def test_run_rolls_back_when_txn_raises(self) -> None:
        db = self.start(sqlite_url(self))

        def add_then_fail_txn(connection: Connection) -> None:
            add_alice_txn(connection)
            raise ValueError("changed my mind")

        self.failureResultOf(db.run(add_then_fail_txn), ValueError)
        self.assertFalse(self.successResultOf(db.run(user_exists_txn, "alice")))

    def test_run_before_start_fails(self) -> None:
        db = Database(sqlite_url(self), None, runner=run_now)
        self.failureResultOf(db.run(list_users_txn), DatabaseNotRunning)

    def test_stop_waits_for_queued_work(self) -> None:
        url = sqlite_url(self)
        runner = QueuedRunner()
        db = Database(url, None, runner=runner)
        started = db.start()
        runner.run_all()
        self.successResultOf(started)

        added = db.run(add_alice_txn)
        stopped = db.stop()
        self.assertNoResult(stopped)
        self.failureResultOf(db.run(list_users_txn), DatabaseNotRunning)

        runner.run_all()
        self.assertEqual(self.successResultOf(added), 1)
        self.successResultOf(stopped)
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        with engine.connect() as connection:
            self.assertEqual(connection.execute(select(users.c.name)).scalars().all(), ["alice"])

    def test_stop_twice(self) -> None:
        db = self.start(sqlite_url(self))
        self.successResultOf(db.stop())
        self.successResultOf(db.stop())

    def test_default_pool_is_named_and_stops_at_shutdown(self) -> None:
        reactor = ThreadHopReactor()
        db = Database(sqlite_url(self), reactor, threads=8)
        started = db.start()
        reactor.wait_for(started)
        self.successResultOf(started)
        self.assertEqual(len(reactor.triggers), 1)
        [(phase, event, _)] = reactor.triggers.values()
        self.assertEqual((phase, event), ("during", "shutdown"))

        def thread_name_txn(connection: Connection) -> str:
            return threading.current_thread().name

        named = db.run(thread_name_txn)
        reactor.wait_for(named)
        self.assertTrue(self.successResultOf(named).startswith("PoolThread-cim-db-"))
        self.assertNotEqual(self.successResultOf(named), threading.current_thread().name)

        stopped = db.stop()
        reactor.wait_for(stopped)
        self.successResultOf(stopped)
        self.assertEqual(reactor.triggers, {})


class SchemaTemplateTests(TestCase):
    """The unit suite's copied schema (tests.fakes.schema) is what the migrations make."""

    def schema_of(self, url: str) -> list[tuple[Any, ...]]:
        """Every table, index and trigger by name (two real migrations may write one
        table's constraints in another order, so the CREATE text is not compared)."""
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT type, name, tbl_name FROM sqlite_master ORDER BY type, name"
            )
            return [tuple(row) for row in rows]

    def test_a_copy_has_the_migrated_schema_and_revision(self) -> None:
        migrated = sqlite_url(self, "migrated")
        upgrade(migrated)
        copied = sqlite_url(self, "copied")
        engine = create_engine_for(copied)
        self.addCleanup(engine.dispose)
        prepare_from_template(engine)
        self.assertEqual(self.schema_of(copied), self.schema_of(migrated))
        self.assertEqual(schema_differences(engine), [])
        self.assertEqual(current_revision(copied), head_revision())
        with engine.begin() as connection:
            self.assertEqual(add_alice_txn(connection), 1)
            self.assertEqual(connection.exec_driver_sql("PRAGMA journal_mode").scalar(), "wal")
