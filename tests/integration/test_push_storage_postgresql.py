"""The push registrations' transactions on PostgreSQL: replace, dead tokens, and the
account's deletion taking its registrations (the foreign key of migration 0011)."""

from __future__ import annotations

from sqlalchemy import delete
from twisted.trial.unittest import TestCase

from cim.storage.database import create_engine_for, upgrade
from cim.storage.push import (
    registrations_of_txn,
    registrations_of_users_txn,
    remove_dead_token_txn,
    remove_registration_txn,
    set_registration_txn,
)
from cim.storage.schema import users
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit.test_storage import add_alice_txn


class PushRegistrationsOnPostgresqlTests(TestCase):
    def test_registrations(self) -> None:
        url = scratch_postgresql_url(self)
        upgrade(url)
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        with engine.begin() as connection:
            add_alice_txn(connection)
            self.assertIsNone(
                set_registration_txn(connection, "ghost", "phone", "fcm", "t", None, None, 1.0)
            )
            set_registration_txn(connection, "alice", "phone", "apns", "aa", None, "zh", 1.0)
            set_registration_txn(connection, "alice", "tablet", "fcm", "bb", "app", None, 2.0)
            replaced = set_registration_txn(
                connection, "alice", "phone", "webhook", "cc", None, None, 3.0
            )
            assert replaced is not None
            self.assertEqual((replaced.token, replaced.created_at), ("cc", 1.0))
            self.assertFalse(remove_dead_token_txn(connection, "alice", "phone", "aa"))
            self.assertTrue(remove_dead_token_txn(connection, "alice", "tablet", "bb"))
            found = registrations_of_users_txn(connection, ["alice", "bob"])
            self.assertEqual([(r.device, r.provider) for r in found], [("phone", "webhook")])
            self.assertFalse(remove_registration_txn(connection, "alice", "tablet"))
            set_registration_txn(connection, "alice", "tablet", "fcm", "dd", None, None, 4.0)
            connection.execute(delete(users).where(users.c.name == "alice"))
            self.assertEqual(registrations_of_txn(connection, "alice"), [])
