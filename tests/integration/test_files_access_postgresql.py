"""File access on PostgreSQL: migration 0008 with its backfill, sharing, deleting and the
purge's locking statements, on a scratch database (skipped without a server, as the
other PostgreSQL tests are)."""

from __future__ import annotations

from typing import Any

from alembic import command
from sqlalchemy import select
from twisted.trial.unittest import TestCase

from cim.files import records
from cim.storage.accounts import insert_user_txn
from cim.storage.database import (
    Database,
    alembic_config,
    create_engine_for,
    upgrade,
    upgrade_engine,
)
from cim.storage.files_access import (
    contents_in_use_txn,
    forget_released_txn,
    may_read_txn,
    purge_unreferenced_txn,
    release_txn,
    share_txn,
)
from cim.storage.schema import file_shares
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit.test_file_shares import add_file_txn
from tests.unit.test_files_migration import SENT, TO_GROUP, fill_txn
from tests.unit.test_storage import run_now


class FileAccessPostgresqlTests(TestCase):
    def test_migration_backfills_the_shares(self) -> None:
        engine = create_engine_for(scratch_postgresql_url(self))
        self.addCleanup(engine.dispose)
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "0006_logic")
            fill_txn(connection)
        upgrade_engine(engine)
        with engine.connect() as connection:
            self.assertTrue(may_read_txn(connection, SENT, "bob"))
            self.assertTrue(may_read_txn(connection, TO_GROUP, "carol"))
            self.assertFalse(may_read_txn(connection, TO_GROUP, "bob"))
            rows = connection.execute(select(file_shares.c.user_name)).scalars()
            self.assertEqual(sorted(rows), ["alice", "alice", "alice", "bob", "carol"])

    def test_share_delete_and_purge(self) -> None:
        url = scratch_postgresql_url(self)
        upgrade(url)
        database = Database(url, None, runner=run_now)
        self.successResultOf(database.start())
        self.addCleanup(database.stop)

        def run(txn: Any, *args: Any) -> Any:
            return self.successResultOf(database.run(txn, *args))

        for name in ("alice", "bob"):
            run(insert_user_txn, name, "scrypt$x", "person", 1.0)
        file_id = "P" * 22
        run(add_file_txn, file_id, "alice")
        self.assertFalse(run(share_txn, [file_id], "bob", "alice", "", 2.0))
        self.assertTrue(run(share_txn, [file_id], "alice", "bob", "", 2.0))
        self.assertTrue(run(share_txn, [file_id], "alice", "bob", "", 3.0))  # again: no-op
        self.assertTrue(run(may_read_txn, file_id, "bob"))
        alices = run(release_txn, file_id, "alice", 10.0)
        self.assertEqual((alices.held, alices.readable, alices.shared), (True, False, True))
        self.assertEqual(run(purge_unreferenced_txn, 10), [])
        bobs = run(release_txn, file_id, "bob", 11.0)
        self.assertEqual((bobs.held, bobs.shared), (False, False))
        self.assertEqual(run(purge_unreferenced_txn, 10), [])  # Alice's holding counts
        self.assertEqual(run(forget_released_txn, 20.0, 10), 1)
        [purged] = run(purge_unreferenced_txn, 10)
        self.assertEqual(purged.id, file_id)
        self.assertEqual(run(contents_in_use_txn, [purged]), set())
        self.assertIsNone(run(records.file_txn, file_id))
        # Holding a purged file fails cleanly: the client uploads it instead.
        self.assertIsNone(run(records.hold_txn, file_id, "bob", 0, 30.0))
