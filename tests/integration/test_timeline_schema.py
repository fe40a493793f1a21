"""The timelines' tables as migration 0010 makes them, on SQLite and PostgreSQL: the
keys and indexes the appends, pages and the purge rely on (the shared tests run on
PostgreSQL too, in tests/unit/test_timeline.py)."""

from __future__ import annotations

from sqlalchemy import inspect
from twisted.trial.unittest import TestCase

from cim.storage.database import create_engine_for, upgrade
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit.test_storage import schema_differences, sqlite_url


class TimelineSchemaTests(TestCase):
    def check_schema(self, url: str) -> None:
        upgrade(url)
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        self.assertEqual(schema_differences(engine), [])
        inspector = inspect(engine)
        tables = set(inspector.get_table_names())
        self.assertLessEqual({"conversations", "timeline", "user_conversations", "cursors"}, tables)
        self.assertFalse({"history", "offline_msgs"} & tables)
        keys = {
            table: inspector.get_pk_constraint(table)["constrained_columns"]
            for table in ("conversations", "timeline", "user_conversations", "cursors")
        }
        self.assertEqual(
            keys,
            {
                "conversations": ["key"],
                "timeline": ["conversation", "seq"],
                "user_conversations": ["user_name", "conversation"],
                "cursors": ["user_name", "device", "conversation"],
            },
        )
        # PostgreSQL lists the unique constraint's own index too.
        indexes = sorted(
            (i["name"], i["column_names"])
            for i in inspector.get_indexes("timeline")
            if not i.get("duplicates_constraint")
        )
        self.assertEqual(
            indexes,
            [
                ("ix_timeline_sender", ["sender", "sender_device", "client_seq"]),
                ("ix_timeline_sent_at", ["sent_at"]),
            ],
        )
        [unique] = inspector.get_unique_constraints("timeline")
        self.assertEqual(unique["column_names"], ["msg_id"])

    def test_sqlite(self) -> None:
        self.check_schema(sqlite_url(self))

    def test_postgresql(self) -> None:
        self.check_schema(scratch_postgresql_url(self))
