"""cim.groups on PostgreSQL: the migrations, the shared tests again, and row locks.

Each test creates a scratch database (see tests/integration/test_storage.py); the SQLite
tests are in tests/unit/test_groups.py. The IM node's rules that ask the directory and
the accounts (``NodeRuleTests``) run here again on PostgreSQL, and once with the
database on its thread pool and the real reactor.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from cim.accounts.store import AccountStore
from cim.config import parse_config
from cim.groups.directory import GroupDirectory, new_group_id
from cim.protocols import cim_pb2
from cim.storage.accounts import delete_user_txn
from cim.storage.database import Database, create_engine_for, upgrade
from cim.storage.groups import add_members_txn, create_group_txn, leave_group_txn
from tests.fakes.node import NodeHarness
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit import test_groups as unit
from tests.unit.test_delivery import settle
from tests.unit.test_groups import START, USERS, add_users_txn
from tests.unit.test_storage import schema_differences, sqlite_url


class MigrationTests(TestCase):
    def check_schema(self, url: str) -> None:
        upgrade(url)
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        self.assertEqual(schema_differences(engine), [])
        inspector = inspect(engine)
        self.assertEqual(
            [c["name"] for c in inspector.get_columns("groups")],
            ["id", "name", "owner", "created_at", "dissolved_at"],
        )
        self.assertEqual(
            [c["name"] for c in inspector.get_columns("group_members")],
            ["group_id", "user_name", "role", "joined_at"],
        )
        self.assertEqual(
            inspector.get_pk_constraint("group_members")["constrained_columns"],
            ["group_id", "user_name"],
        )
        self.assertEqual(
            [(i["name"], i["column_names"]) for i in inspector.get_indexes("group_members")],
            [("ix_group_members_user_name", ["user_name"])],
        )
        foreign = {
            (fk["referred_table"], tuple(fk["referred_columns"]), fk["options"].get("ondelete"))
            for fk in inspector.get_foreign_keys("group_members")
        }
        self.assertEqual(foreign, {("groups", ("id",), "CASCADE"), ("users", ("name",), "CASCADE")})

    def test_sqlite(self) -> None:
        self.check_schema(sqlite_url(self))

    def test_postgresql(self) -> None:
        self.check_schema(scratch_postgresql_url(self))


class PostgresqlGroupTests(unit.GroupTests):
    def database_url(self) -> str:
        url = scratch_postgresql_url(self)
        upgrade(url)
        return url


class PostgresqlAnswerTests(unit.AnswerTests):
    def database_url(self) -> str:
        url = scratch_postgresql_url(self)
        upgrade(url)
        return url


class PostgresqlLockTests(TestCase):
    """Changes to one group serialise on its row; a user being added cannot be deleted.

    The second transaction runs with a short ``lock_timeout``, so "it would wait" shows
    up as an error at once instead of as a hang.
    """

    def setUp(self) -> None:
        url = scratch_postgresql_url(self)
        upgrade(url)
        self.engine = create_engine_for(url)
        self.addCleanup(self.engine.dispose)
        with self.engine.begin() as connection:
            add_users_txn(connection, USERS)
            self.group = create_group_txn(
                connection, new_group_id(), "t", "alice", ["bob"], START, 10
            ).id

    def assert_would_wait(self, txn: Callable[[Connection], object]) -> None:
        with self.engine.connect() as other, other.begin():
            other.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
            with self.assertRaises(OperationalError) as caught:
                txn(other)
        self.assertIn("lock timeout", str(caught.exception))

    def test_changes_to_one_group_take_turns(self) -> None:
        with self.engine.begin() as first:
            add_members_txn(first, self.group, "alice", ["carol"], START, 10)
            self.assert_would_wait(
                lambda c: add_members_txn(c, self.group, "alice", ["dave"], START, 10)
            )
            self.assert_would_wait(lambda c: leave_group_txn(c, self.group, "alice", START))

    def test_user_being_added_cannot_be_deleted_meanwhile(self) -> None:
        with self.engine.begin() as first:
            add_members_txn(first, self.group, "alice", ["carol"], START, 10)
            self.assert_would_wait(lambda c: delete_user_txn(c, "carol"))


class PostgresqlNodeRuleTests(unit.NodeRuleTests):
    def database_url(self) -> str:
        url = scratch_postgresql_url(self)
        upgrade(url)
        return url


class ThreadedNodeRuleTests(TestCase):
    """The membership and account checks with the database on its thread pool, as in
    the daemon: their answers come back on a later reactor turn (the node's own time
    stays fake). On the real reactor and threads, so here and not in tests/unit."""

    timeout = 30

    async def test_members_post_and_strangers_are_refused(self) -> None:
        db = Database(sqlite_url(self), reactor, threads=2)
        await db.start()
        self.addCleanup(db.stop)
        await db.run(add_users_txn, USERS)
        node = NodeHarness()
        node.im.directory.groups = groups = GroupDirectory(db, node.clock)
        node.im.directory.user_exists = AccountStore(
            db, parse_config("[node]\nid = node1\n").accounts, reactor=node.clock
        ).exists
        team = await groups.create("alice", "team", ["bob"])
        alice = node.connect("alice")
        bob = node.connect("bob", auto_ack=True)
        erin = node.connect("erin")

        async def until(check: Callable[[], bool], what: str) -> None:
            for _ in range(300):
                settle(node)
                if check():
                    return
                await deferLater(reactor, 0.01, lambda: None)
            self.fail(f"gave up waiting for {what}")

        erin.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(group=team.id, text="x", client_seq=1))
        await until(lambda: bool(erin.events.of_type(cim_pb2.ERROR)), "the refusal")
        self.assertEqual(
            erin.events.of_type(cim_pb2.ERROR)[0].message, "only members can post to a group"
        )
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(group=team.id, text="y", client_seq=1))
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="nobody", text="z", client_seq=2))
        await until(lambda: len(alice.events.of_type(cim_pb2.ACK_N)) == 2, "both outcomes")
        outcomes = {a.client_seq: (a.status, a.reason) for a in alice.events.of_type(cim_pb2.ACK_N)}
        self.assertEqual(outcomes, {1: (cim_pb2.ACCEPTED, ""), 2: (cim_pb2.FAILED, "no such user")})
        self.assertEqual([m.text for m in bob.events.of_type(cim_pb2.MSG_N)], ["y"])
