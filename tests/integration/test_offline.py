"""cim.offline on PostgreSQL: the migrations, the shared tests again, and the cap's lock.

Each test creates a scratch database (see tests/integration/test_storage.py); the SQLite
tests are in tests/unit/test_offline.py.
"""

from __future__ import annotations

from collections.abc import Callable

from cim.storage.offline import OfflineRecord, store_offline_txn
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from twisted.trial.unittest import TestCase

from cim.storage.database import create_engine_for, upgrade
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit import test_offline as unit
from tests.unit.test_offline import START
from tests.unit.test_storage import schema_differences, sqlite_url


class MigrationTests(TestCase):
    def check_schema(self, url: str) -> None:
        upgrade(url)
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        self.assertEqual(schema_differences(engine), [])
        inspector = inspect(engine)
        self.assertEqual(
            [c["name"] for c in inspector.get_columns("offline_msgs")],
            [
                "receiver_uid",
                "msg_id",
                "send_time",
                "sender_uid",
                "msg_type",
                "msg_content",
                "group_id",
                "payload",
            ],
        )
        self.assertEqual(
            inspector.get_pk_constraint("offline_msgs")["constrained_columns"],
            ["receiver_uid", "msg_id"],
        )
        self.assertEqual(
            inspector.get_pk_constraint("history")["constrained_columns"],
            ["conversation", "msg_id"],
        )
        self.assertEqual(
            [(i["name"], i["column_names"]) for i in inspector.get_indexes("history")],
            [("ix_history_sent_at", ["sent_at"])],
        )

    def test_sqlite(self) -> None:
        self.check_schema(sqlite_url(self))

    def test_postgresql(self) -> None:
        self.check_schema(scratch_postgresql_url(self))


class PostgresqlOfflineTests(unit.OfflineTests):
    def database_url(self) -> str:
        url = scratch_postgresql_url(self)
        upgrade(url)
        return url


class PostgresqlHistoryTests(unit.HistoryTests):
    def database_url(self) -> str:
        url = scratch_postgresql_url(self)
        upgrade(url)
        return url


class PostgresqlCapLockTests(TestCase):
    """Two transactions storing for one receiver under a cap take turns.

    The second runs with a short ``lock_timeout``, so "it would wait" shows up as an
    error at once instead of as a hang.
    """

    def setUp(self) -> None:
        url = scratch_postgresql_url(self)
        upgrade(url)
        self.engine = create_engine_for(url)
        self.addCleanup(self.engine.dispose)

    def record(self, receiver: str, msg_id: int) -> OfflineRecord:
        return OfflineRecord(receiver, msg_id, START, "alice", 0, "", None, b"")

    def would_wait(self, txn: Callable[[Connection], object]) -> bool:
        with self.engine.connect() as other, other.begin():
            other.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
            try:
                txn(other)
            except OperationalError as exc:
                self.assertIn("lock timeout", str(exc))
                return True
        return False

    def test_same_receiver_waits_other_receiver_does_not(self) -> None:
        with self.engine.begin() as first:
            store_offline_txn(first, [self.record("bob", 1)], 5)
            self.assertTrue(
                self.would_wait(lambda c: store_offline_txn(c, [self.record("bob", 2)], 5))
            )
            self.assertFalse(
                self.would_wait(lambda c: store_offline_txn(c, [self.record("carol", 2)], 5))
            )
