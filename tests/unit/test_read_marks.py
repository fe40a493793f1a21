"""cim.storage.read_marks and the read marks in the timelines' readers: marks move
forward only, never past the end, only in the user's conversations; what others see
follows the read_receipts setting; the summary and the pulls count past max(device
cursor, read mark); who read a group message, asked by its sender only.

The ``*Tests`` classes run on a temporary SQLite file; their ``Postgresql*``
subclasses run the same tests on a scratch PostgreSQL database (skipped without a
server unless CIM_REQUIRE_SERVICES=1), as tests.unit.test_timeline does.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection
from twisted.trial.unittest import TestCase

from cim.history.store import group_conversation
from cim.im.catchup import summary_frame
from cim.storage.accounts import insert_user_txn
from cim.storage.contact_changes import set_settings_txn
from cim.storage.contacts import PrivacyDefaults
from cim.storage.read_marks import (
    ReadRefused,
    mark_read_txn,
    read_receipts_txn,
    readers_txn,
)
from cim.storage.schema import read_marks, users
from cim.storage.timeline import (
    CursorMove,
    append_txn,
    group_joined,
    group_left,
    move_cursors_txn,
)
from cim.storage.timeline_reads import summary_txn, unread_page_txn
from tests.unit.test_timeline import (
    AB,
    GROUP,
    START,
    DatabaseMixin,
    _MigratedPostgresql,
    message,
    new,
)

GC = group_conversation(GROUP)


def receipts(connection: Connection, user: str, setting: str) -> None:
    """An account ``user`` (made if missing) with read receipts ``setting``."""
    if connection.execute(select(users.c.name).where(users.c.name == user)).first() is None:
        insert_user_txn(connection, user, "scrypt$hash", "person", START)
    set_settings_txn(connection, user, None, None, PrivacyDefaults(), setting)


def forget_accounts(connection: Connection) -> None:
    connection.execute(delete(users).where(users.c.name.in_(["alice", "bob", "carol"])))


class MarkTests(DatabaseMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.txn(forget_accounts)
        self.txn(append_txn, [new(message(n)) for n in range(1, 6)])  # alice -> bob, 1..5

    def mark(self, user: str, seq: int, conversation: str = AB) -> object:
        return self.txn(mark_read_txn, user, conversation, seq, START)

    def refusal(self, user: str, seq: int, conversation: str = AB) -> str:
        failure = self.failureResultOf(
            self.db.run(mark_read_txn, user, conversation, seq, START), ReadRefused
        )
        return str(failure.value.code)

    def test_a_mark_moves_forward_only(self) -> None:
        first = self.mark("bob", 3)
        self.assertEqual((first.seq, first.moved, first.shown_moved), (3, True, True))  # type: ignore[attr-defined]
        self.assertEqual(first.peer, "alice")  # type: ignore[attr-defined]
        back = self.mark("bob", 2)
        self.assertEqual((back.seq, back.moved, back.shown_moved), (3, False, False))  # type: ignore[attr-defined]
        again = self.mark("bob", 5)
        self.assertEqual((again.seq, again.last_seq), (5, 5))  # type: ignore[attr-defined]

    def test_past_the_end_zero_and_strangers_are_refused_and_change_nothing(self) -> None:
        self.assertEqual(self.refusal("bob", 6), "bad_request")
        self.assertEqual(self.refusal("bob", 0), "bad_request")
        self.assertEqual(self.refusal("carol", 1), "forbidden")
        self.assertEqual(self.refusal("bob", 1, "d:bob:nobody"), "not_found")
        self.assertEqual(self.txn(lambda c: c.execute(select(read_marks)).all()), [])

    def test_the_summary_counts_past_the_higher_of_cursor_and_mark(self) -> None:
        self.txn(move_cursors_txn, [CursorMove("bob", "web", AB, 1)])
        [state] = self.txn(summary_txn, "bob", "web")
        self.assertEqual((state.unread, state.read), (4, 0))
        self.mark("bob", 4)  # read on the phone
        [state] = self.txn(summary_txn, "bob", "web")
        self.assertEqual((state.unread, state.cursor, state.read), (1, 4, 4))
        self.mark("bob", 5)
        [state] = self.txn(summary_txn, "bob", "web")
        self.assertEqual((state.unread, state.newest), (0, None))
        frame = summary_frame(self.txn(summary_txn, "bob", "web"), 65000, 1)
        self.assertEqual(frame.total, 0)
        self.assertEqual([(c.conversation, c.seq) for c in frame.caught_up], [(AB, 5)])
        # Pulls agree: nothing past the mark, in one conversation or across all.
        self.assertEqual(self.txn(unread_page_txn, "bob", "web", AB, None, 10).records, ())
        self.assertEqual(self.txn(unread_page_txn, "bob", "web", None, None, 10).records, ())

    def test_the_peer_sees_the_mark_in_its_summary(self) -> None:
        self.mark("bob", 4)
        [state] = self.txn(summary_txn, "alice", "phone")
        self.assertEqual(state.peer_read, 4)
        self.txn(append_txn, [new(message(6, "bob", "alice"))])
        frame = summary_frame(self.txn(summary_txn, "alice", "phone"), 65000, 1)
        [entry] = frame.conversations
        self.assertEqual((entry.peer, entry.peer_read_seq, entry.read_seq), ("bob", 4, 0))
        self.mark("alice", 6)
        frame = summary_frame(self.txn(summary_txn, "alice", "phone"), 65000, 1)
        self.assertEqual(
            [(c.conversation, c.seq) for c in frame.peer_reads], [(AB, 4)]
        )  # caught up: the peer's mark still travels

    def test_with_receipts_off_the_peer_sees_nothing_but_the_mark_still_counts(self) -> None:
        self.txn(receipts, "bob", "off")
        self.assertFalse(self.txn(read_receipts_txn, "bob"))
        mark = self.mark("bob", 5)
        self.assertEqual(
            (mark.seq, mark.shown_seq, mark.moved, mark.shown_moved), (5, 0, True, False)
        )  # type: ignore[attr-defined]
        [state] = self.txn(summary_txn, "alice", "phone")
        self.assertEqual(state.peer_read, 0)
        [own] = self.txn(summary_txn, "bob", "web")
        self.assertEqual(own.unread, 0)
        # Turned on again: what is shown is the highest seq marked while on.
        self.txn(receipts, "bob", "on")
        again = self.mark("bob", 3)
        self.assertEqual((again.seq, again.shown_seq, again.moved), (5, 3, False))  # type: ignore[attr-defined]
        self.txn(append_txn, [new(message(6))])
        self.assertEqual(self.mark("bob", 6).shown_seq, 6)  # type: ignore[attr-defined]


class ReadersTests(DatabaseMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.txn(forget_accounts)
        self.txn(group_joined, GROUP, ["alice", "bob", "carol"])
        self.txn(append_txn, [new(message(n, group=GROUP)) for n in (1, 2)])  # alice's posts
        self.txn(group_joined, GROUP, ["dave"])  # after them

    def readers(self, asker: str, seq: int) -> object:
        return self.txn(readers_txn, asker, GC, seq)

    def test_the_sender_learns_who_read_its_message(self) -> None:
        self.txn(mark_read_txn, "bob", GC, 2, START)
        self.txn(mark_read_txn, "carol", GC, 1, START)
        first = self.readers("alice", 1)
        self.assertEqual((first.readers, first.count, first.members), (("bob", "carol"), 2, 2))  # type: ignore[attr-defined]
        second = self.readers("alice", 2)
        self.assertEqual((second.readers, second.count), (("bob",), 1))  # type: ignore[attr-defined]

    def test_only_the_sender_may_ask_and_only_members(self) -> None:
        failure = self.failureResultOf(self.db.run(readers_txn, "bob", GC, 1), ReadRefused)
        self.assertEqual(failure.value.code, "forbidden")
        failure = self.failureResultOf(self.db.run(readers_txn, "zed", GC, 1), ReadRefused)
        self.assertEqual(failure.value.code, "forbidden")
        failure = self.failureResultOf(self.db.run(readers_txn, "alice", GC, 3), ReadRefused)
        self.assertEqual(failure.value.code, "bad_request")

    def test_receipts_off_and_leaving_take_a_member_out(self) -> None:
        self.txn(receipts, "carol", "off")
        self.txn(mark_read_txn, "carol", GC, 2, START)
        self.txn(mark_read_txn, "bob", GC, 2, START)
        self.assertEqual(self.readers("alice", 2).readers, ("bob",))  # type: ignore[attr-defined]
        self.txn(group_left, GROUP, ["bob"])
        answer = self.readers("alice", 2)
        self.assertEqual((answer.readers, answer.members), ((), 1))  # type: ignore[attr-defined]
        marks = self.txn(lambda c: c.execute(select(read_marks.c.user_name)).scalars().all())
        self.assertEqual(marks, ["carol"])  # bob's mark went with his reader row


class PostgresqlMarkTests(_MigratedPostgresql, MarkTests):
    pass


class PostgresqlReadersTests(_MigratedPostgresql, ReadersTests):
    pass
