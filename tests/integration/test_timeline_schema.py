"""The timelines' tables as migrations 0010 and 0011 make them, on SQLite and
PostgreSQL: the keys and indexes the appends, pages, the purge and recalls rely on (the
shared tests run on PostgreSQL too, in tests/unit/test_timeline.py and
test_change_storage.py); 0011 goes down to 0010 and up again keeping the rows."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, select, text
from twisted.trial.unittest import TestCase

from cim.storage.database import alembic_config, create_engine_for, upgrade
from cim.storage.schema import timeline
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit.test_storage import schema_differences, sqlite_url


def _index_definition(url: str, name: str) -> str:
    """The index's DDL as the database keeps it."""
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                query = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"
            else:
                query = "SELECT indexdef FROM pg_indexes WHERE indexname = :name"
            return str(connection.execute(text(query), {"name": name}).scalar_one())
    finally:
        engine.dispose()


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
                ("ix_timeline_replaces", ["replaces"]),
                ("ix_timeline_sender", ["sender", "sender_device", "client_seq"]),
            ],
        )
        # Migration 0014: only change entries write the index on replaces.
        self.assertIn("replaces IS NOT NULL", _index_definition(url, "ix_timeline_replaces"))
        [unique] = inspector.get_unique_constraints("timeline")
        self.assertEqual(unique["column_names"], ["msg_id"])
        self.down_and_up(url)

    def down_and_up(self, url: str) -> None:
        """Down to 0010 through 0012 and 0011 (the column goes, the rows stay) and up again."""
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        row = {
            "conversation": "d:alice:bob",
            "seq": 1,
            "msg_id": 7,
            "sender": "alice",
            "sender_device": "phone",
            "client_seq": 1,
            "sent_at": 1.0,
            "payload": b"x",
            "size": 1,
        }
        with engine.begin() as connection:
            connection.execute(timeline.insert().values(**row, replaces=None))
        with engine.connect() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0010_timelines")
            connection.commit()
        columns = {c["name"] for c in inspect(engine).get_columns("timeline")}
        self.assertNotIn("replaces", columns)
        upgrade(url)
        with engine.begin() as connection:
            ids = connection.execute(select(timeline.c.msg_id, timeline.c.replaces)).all()
        self.assertEqual([tuple(r) for r in ids], [(7, None)])

    def test_sqlite(self) -> None:
        self.check_schema(sqlite_url(self))

    def test_postgresql(self) -> None:
        self.check_schema(scratch_postgresql_url(self))


class MigrationChainTests(TestCase):
    """Every migration's downgrade runs: head down to base and up again leaves the
    schema the code declares (a constraint dropped under a name the naming convention
    mangles, as 0007's and 0012's once did, fails here)."""

    def down_to_base_and_up(self, url: str) -> None:
        upgrade(url)
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        with engine.connect() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
            connection.commit()
        self.assertEqual(set(inspect(engine).get_table_names()) - {"alembic_version"}, set())
        upgrade(url)
        self.assertEqual(schema_differences(engine), [])

    def test_sqlite(self) -> None:
        self.down_to_base_and_up(sqlite_url(self))

    def test_postgresql(self) -> None:
        self.down_to_base_and_up(scratch_postgresql_url(self))
