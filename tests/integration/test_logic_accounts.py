"""Account deletion racing itself on PostgreSQL, where the row lock decides."""

from __future__ import annotations

import threading
from typing import Any

from twisted.trial.unittest import TestCase

from cim.storage.accounts import insert_user_txn
from cim.storage.database import create_engine_for
from cim.storage.profiles import delete_account_txn
from cim.storage.schema import bindings, metadata
from tests.integration.test_logic_posts import wait_for_a_lock_wait
from tests.integration.test_storage import scratch_postgresql_url


class PostgresqlDeletionTests(TestCase):
    def test_two_deletions_at_once_delete_and_tell_once(self) -> None:
        engine = create_engine_for(scratch_postgresql_url(self))
        self.addCleanup(engine.dispose)
        metadata.create_all(engine)
        with engine.begin() as connection:
            insert_user_txn(connection, "ann", "hash", "person", 1.0)
            insert_user_txn(connection, "watch", "hash", "device", 1.0)
            connection.execute(
                bindings.insert().values(
                    device="watch", guardian="ann", status="active", created_at=1.0
                )
            )
        holder = engine.connect()
        self.addCleanup(holder.close)
        transaction = holder.begin()
        first = delete_account_txn(holder, "ann", 2.0)
        outcome: list[Any] = []

        def delete_again() -> None:
            with engine.begin() as connection:
                outcome.append(delete_account_txn(connection, "ann", 2.0))

        racer = threading.Thread(target=delete_again)
        racer.start()
        self.assertTrue(wait_for_a_lock_wait(engine), "the second deletion did not wait")
        transaction.commit()
        racer.join(10)
        self.assertFalse(racer.is_alive())
        self.assertEqual((first.told if first else None, outcome), (["watch"], [None]))
