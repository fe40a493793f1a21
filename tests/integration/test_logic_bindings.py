"""Bindings racing each other on PostgreSQL, where the row lock decides."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from twisted.trial.unittest import TestCase

from cim.storage.accounts import insert_user_txn
from cim.storage.bindings import BindResult, bind_with_code_txn, store_binding_code_txn
from cim.storage.database import create_engine_for
from cim.storage.schema import binding_codes, metadata
from tests.integration.test_logic_posts import wait_for_a_lock_wait
from tests.integration.test_storage import scratch_postgresql_url


class PostgresqlBindingTests(TestCase):
    """The storage on PostgreSQL, where requests really run at once."""

    def setUp(self) -> None:
        self.engine = create_engine_for(scratch_postgresql_url(self))
        self.addCleanup(self.engine.dispose)
        metadata.create_all(self.engine)
        with self.engine.begin() as connection:
            insert_user_txn(connection, "watch", "hash", "device", 1.0)
            insert_user_txn(connection, "ann", "hash", "person", 1.0)

    def race(self, first: Callable[[Connection], Any], second: Callable[[Connection], Any]) -> Any:
        """Run ``first`` in an open transaction, ``second`` meanwhile (it must wait for
        the first's lock), commit the first; returns what ``second`` returned."""
        results: dict[str, Any] = {}
        holder = self.engine.connect()
        self.addCleanup(holder.close)
        transaction = holder.begin()
        first(holder)

        def run_second() -> None:
            try:
                with self.engine.begin() as connection:
                    results["second"] = second(connection)
            except Exception as exc:
                results["second"] = exc

        racer = threading.Thread(target=run_second)
        racer.start()
        self.assertTrue(wait_for_a_lock_wait(self.engine), "the second did not wait")
        transaction.commit()
        racer.join(10)
        self.assertFalse(racer.is_alive())
        return results["second"]

    def test_two_codes_asked_for_at_once_both_succeed(self) -> None:
        second = self.race(
            lambda c: store_binding_code_txn(c, "watch", "a" * 64, 100.0, 1.0),
            lambda c: store_binding_code_txn(c, "watch", "b" * 64, 101.0, 1.0),
        )
        self.assertIsNone(second)
        with self.engine.begin() as connection:
            rows = connection.execute(select(binding_codes.c.code_hash)).scalars().all()
        self.assertEqual(rows, ["b" * 64])

    def test_a_retried_bind_racing_its_first_try_gets_the_binding(self) -> None:
        with self.engine.begin() as connection:
            store_binding_code_txn(connection, "watch", "a" * 64, 100.0, 1.0)
        second = self.race(
            lambda c: bind_with_code_txn(c, "watch", "ann", "a" * 64, 2.0),
            lambda c: bind_with_code_txn(c, "watch", "ann", "a" * 64, 2.0),
        )
        self.assertEqual((second.result, second.binding.status), (BindResult.EXISTS, "active"))
