"""cim.storage.changes: one transaction checks a recall or edit, appends its entry and
rewrites the stored message; a refusal changes nothing. On a temporary SQLite file;
``Postgresql*`` runs the same on a scratch PostgreSQL database (skipped without a
server unless CIM_REQUIRE_SERVICES=1)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select
from twisted.trial.unittest import TestCase

from cim.protocols import cim_pb2
from cim.storage.changes import ChangeAsked, ChangeMade, ChangeRefused, change_txn
from cim.storage.database import create_engine_for
from cim.storage.schema import conversations, group_members, groups, timeline, users
from cim.storage.timeline import append_txn
from tests.unit.test_timeline import (
    AB,
    GROUP,
    START,
    DatabaseMixin,
    _MigratedPostgresql,
    message,
    new,
)

RECALL = cim_pb2.RECALL
EDIT = cim_pb2.EDIT


def asked(
    msg_id: int, kind: int, actor: str = "alice", text: str = "", after: float = 10.0
) -> ChangeAsked:
    return ChangeAsked(
        actor, "phone", msg_id, kind, text, 9000 + int(after), START + after, 120, 900
    )


def group_txn(connection: Any) -> None:
    """alice owns GROUP, bob is an admin, carol a member."""
    for name in ("alice", "bob", "carol"):
        connection.execute(
            insert(users).values(name=name, password_hash="x", kind="person", created_at=1.0)
        )
    connection.execute(insert(groups).values(id=GROUP, name="team", owner="alice", created_at=1))
    for name, role in (("alice", "owner"), ("bob", "admin"), ("carol", "member")):
        connection.execute(
            insert(group_members).values(group_id=GROUP, user_name=name, role=role, joined_at=1)
        )


class ChangeStorageTests(DatabaseMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.txn(append_txn, [new(message(1, text="the original"))])

    def stored(self, msg_id: int) -> cim_pb2.Message:
        payload = self.txn(
            lambda c: c.execute(
                select(timeline.c.payload).where(timeline.c.msg_id == msg_id)
            ).scalar_one()
        )
        return cim_pb2.Message.FromString(bytes(payload))

    def last_seq(self, key: str = AB) -> int:
        return int(
            self.txn(
                lambda c: c.execute(
                    select(conversations.c.last_seq).where(conversations.c.key == key)
                ).scalar_one()
            )
        )

    def refused(self, change: ChangeAsked, reason: str) -> None:
        before = self.stored(change.msg_id).SerializeToString()
        failure = self.failureResultOf(self.db.run(change_txn, change), ChangeRefused)
        self.assertEqual(failure.value.reason, reason)
        self.assertEqual(self.stored(change.msg_id).SerializeToString(), before)

    def test_recall_appends_an_entry_and_removes_the_content(self) -> None:
        made: ChangeMade = self.txn(change_txn, asked(1, RECALL, after=60))
        self.assertEqual((made.appended.conversation, made.appended.seq), (AB, 2))
        self.assertEqual((made.entry.replaces, made.entry.replaces_seq), (1, 1))
        self.assertEqual((made.entry.to, made.parties), ("bob", ("alice", "bob")))
        self.assertEqual(self.last_seq(), 2)
        stored = self.stored(1)
        self.assertEqual((stored.text, stored.recalled, stored.changed_by), ("", True, "alice"))
        self.assertEqual(getattr(stored, "from"), "alice")  # who sent it, when, stays
        replaces = self.txn(
            lambda c: c.execute(
                select(timeline.c.replaces).where(timeline.c.msg_id == 9060)
            ).scalar_one()
        )
        self.assertEqual(replaces, 1)

    def test_edit_keeps_the_newest_text_and_the_receiver_may_not(self) -> None:
        self.txn(change_txn, asked(1, EDIT, text="first fix", after=100))
        made = self.txn(change_txn, asked(1, EDIT, text="second fix", after=200))
        self.assertEqual((made.entry.text, made.entry.seq), ("second fix", 3))
        self.assertEqual((self.stored(1).text, self.stored(1).edited), ("second fix", True))
        self.refused(asked(1, EDIT, actor="bob", text="bob's", after=300), "not_yours")

    def test_recall_removes_the_text_of_earlier_edits(self) -> None:
        self.txn(change_txn, asked(1, EDIT, text="said twice", after=20))
        self.txn(change_txn, asked(1, RECALL, after=30))
        self.assertEqual(self.stored(9020).text, "")
        payloads = self.txn(lambda c: c.execute(select(timeline.c.payload)).scalars().all())
        self.assertFalse(
            any(b"said twice" in bytes(p) or b"original" in bytes(p) for p in payloads)
        )

    def test_refusals_change_nothing(self) -> None:
        self.refused(asked(1, RECALL, after=121), "too_late")
        self.refused(asked(1, EDIT, text="late", after=901), "too_late")
        self.refused(asked(1, RECALL, actor="bob"), "not_yours")
        self.refused(asked(1, RECALL, actor="mallory"), "unknown_message")
        self.assertEqual(self.last_seq(), 1)
        self.failureResultOf(self.db.run(change_txn, asked(77, RECALL)), ChangeRefused)

    def test_a_group_admin_recalls_any_post_a_member_only_their_own(self) -> None:
        self.txn(group_txn)
        self.txn(append_txn, [new(message(5, sender="carol", group=GROUP))])
        self.txn(append_txn, [new(message(6, sender="alice", group=GROUP))])
        self.refused(asked(6, RECALL, actor="carol", after=20), "not_yours")
        self.refused(asked(6, RECALL, actor="mallory", after=20), "unknown_message")
        made = self.txn(change_txn, asked(5, RECALL, actor="bob", after=3600))
        self.assertEqual((made.entry.group, made.entry.seq, made.parties), (GROUP, 3, ()))
        self.assertEqual(self.stored(5).changed_by, "bob")
        self.refused(asked(5, EDIT, actor="carol", text="back", after=3601), "recalled")


class PostgresqlChangeStorageTests(_MigratedPostgresql, ChangeStorageTests):
    def database_url(self) -> str:
        url = super().database_url()
        engine = create_engine_for(url, pool_size=1)
        try:
            with engine.begin() as connection:
                for table in (group_members, groups, users):
                    connection.execute(table.delete())
        finally:
            engine.dispose()
        return url
