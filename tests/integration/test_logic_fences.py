"""Fence reports racing each other on PostgreSQL, where the row lock decides."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from twisted.trial.unittest import TestCase

from cim.config import parse_config
from cim.logic.context import LogicContext
from cim.logic.fences import Fences
from cim.storage.accounts import insert_user_txn
from cim.storage.database import create_engine_for
from cim.storage.fences import (
    NewPosition,
    Report,
    TooManyFences,
    create_fence_txn,
    list_fences_txn,
    positions_txn,
    purge_positions_txn,
    report_positions_txn,
)
from cim.storage.schema import bindings, metadata
from tests.integration.test_logic_posts import wait_for_a_lock_wait
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit.test_logic_fences import CIRCLE, LAT, LON, north


class PostgresqlReportTests(TestCase):
    """The storage on PostgreSQL: two reports racing over one crossing announce it once."""

    def test_fences_created_at_once_keep_to_the_limit(self) -> None:
        engine = create_engine_for(scratch_postgresql_url(self))
        self.addCleanup(engine.dispose)
        metadata.create_all(engine)
        with engine.begin() as connection:
            insert_user_txn(connection, "watch", "hash", "device", 1.0)
            insert_user_txn(connection, "ann", "hash", "person", 1.0)
            connection.execute(
                insert(bindings).values(
                    device="watch", guardian="ann", status="active", created_at=1.0
                )
            )

        def create(connection: Connection) -> Any:
            return create_fence_txn(
                connection, "watch", "ann", "home", "circle", CIRCLE["circle"], 1.0, 1
            )

        holder = engine.connect()
        self.addCleanup(holder.close)
        transaction = holder.begin()
        create(holder)
        outcome: list[Any] = []

        def create_again() -> None:
            try:
                with engine.begin() as connection:
                    outcome.append(create(connection))
            except TooManyFences as exc:
                outcome.append(exc)

        racer = threading.Thread(target=create_again)
        racer.start()
        wait_for_a_lock_wait(engine, 3.0)
        transaction.commit()
        racer.join(10)
        self.assertFalse(racer.is_alive())
        self.assertIsInstance(outcome[0], TooManyFences)
        with engine.begin() as connection:
            self.assertEqual(len(list_fences_txn(connection, "watch", "ann")), 1)

    def test_racing_reports_announce_a_crossing_once(self) -> None:
        engine = create_engine_for(scratch_postgresql_url(self))
        self.addCleanup(engine.dispose)
        metadata.create_all(engine)
        config = parse_config("[node]\nid = n1\n[logic]\nfence_confirmations = 1\n").logic
        advance = Fences(cast(LogicContext, SimpleNamespace(config=config)))._advance
        with engine.begin() as connection:
            insert_user_txn(connection, "watch", "hash", "device", 1.0)
            insert_user_txn(connection, "ann", "hash", "person", 1.0)
            connection.execute(
                insert(bindings).values(
                    device="watch", guardian="ann", status="active", created_at=1.0
                )
            )
            create_fence_txn(
                connection, "watch", "ann", "home", "circle", CIRCLE["circle"], 1.0, 10
            )
            inside = [NewPosition(LAT, LON, 5.0, 10.0)]
            first = report_positions_txn(connection, "watch", inside, 10.0, advance)
        self.assertEqual((first.accepted, first.transitions), (1, []))

        outside = [NewPosition(north(500), LON, None, 20.0)]
        reports: dict[str, Report] = {}
        holder = engine.connect()
        self.addCleanup(holder.close)
        transaction = holder.begin()
        reports["first"] = report_positions_txn(holder, "watch", outside, 20.0, advance)

        def report_again() -> None:
            again = [NewPosition(north(600), LON, None, 21.0)]
            with engine.begin() as connection:
                reports["second"] = report_positions_txn(connection, "watch", again, 21.0, advance)

        racer = threading.Thread(target=report_again)
        racer.start()
        self.assertTrue(wait_for_a_lock_wait(engine), "the second report did not wait")
        transaction.commit()
        racer.join(10)
        self.assertFalse(racer.is_alive())
        self.assertEqual([t.event for t in reports["first"].transitions], ["left"])
        self.assertEqual(reports["first"].guardians, ["ann"])
        self.assertEqual(reports["second"].transitions, [])
        with engine.begin() as connection:
            history = positions_txn(connection, "watch", "ann", None, None, 10)
            self.assertEqual([p.at for p in history], [21.0, 20.0, 10.0])
            self.assertEqual(purge_positions_txn(connection, 20.5, 1), 1)
            self.assertEqual(purge_positions_txn(connection, 20.5, 5), 1)
            self.assertEqual(purge_positions_txn(connection, 20.5, 5), 0)
