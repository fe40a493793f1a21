"""cim.storage.timeline and cim.history.timeline: seq assignment, cursors, the summary,
pages, the group commit and its failures, the purge.

The database runs synchronously through an injected runner, time is a ``task.Clock``.
The ``*Tests`` classes run on a temporary SQLite file; their ``Postgresql*`` subclasses
run the same tests on a scratch PostgreSQL database (skipped without a server unless
CIM_REQUIRE_SERVICES=1). Two writers on one conversation through two ``Database``
objects (two pools, two connections) run on PostgreSQL with real threads.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cim.history.store import direct_conversation, group_conversation
from cim.history.timeline import Timelines, TimelineSettings, TimelineUnavailable
from cim.im.catchup import summary_frame
from cim.message_ids import first_id_at
from cim.protocols import cim_pb2
from cim.storage.database import Database, create_engine_for, upgrade
from cim.storage.schema import conversations, cursors, timeline, user_conversations
from cim.storage.timeline import (
    CursorMove,
    NewMessage,
    append_txn,
    enrol_and_move_txn,
    enrol_device_txn,
    group_joined,
    group_left,
    move_cursors_txn,
)
from cim.storage.timeline_reads import (
    conversation_page_txn,
    purge_timeline_txn,
    summary_txn,
    unread_page_txn,
)
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit.test_storage import run_now, sqlite_url

T = TypeVar("T")

START = 1_800_000_000.0
"""After the id epoch (cim.message_ids), so ids made from times are real ones."""
GROUP = "abcdefghijklmnopqrstuvwxyz"
AB = direct_conversation("alice", "bob")


def message(
    msg_id: int,
    sender: str = "alice",
    to: str = "bob",
    group: str = "",
    text: str | None = None,
    client_seq: int | None = None,
    sent_at: float = START,
) -> cim_pb2.Message:
    m = cim_pb2.Message(
        id=msg_id,
        to="" if group else to,
        group=group,
        text=f"message {msg_id}" if text is None else text,
        sent_at_ms=int(sent_at * 1000),
        client_seq=msg_id if client_seq is None else client_seq,
        device="phone",
    )
    setattr(m, "from", sender)
    return m


def new(m: cim_pb2.Message, device: str = "phone") -> NewMessage:
    sender = getattr(m, "from")
    readers: tuple[tuple[str, str], ...] = () if m.group else ((sender, m.to), (m.to, sender))
    return NewMessage(
        group_conversation(m.group) if m.group else direct_conversation(sender, m.to),
        m.id,
        sender,
        device,
        m.client_seq,
        m.sent_at_ms / 1000,
        m.SerializeToString(),
        readers,
    )


class DatabaseMixin:
    def database_url(self) -> str:
        return sqlite_url(self)  # type: ignore[arg-type]

    def setUp(self) -> None:
        case: Any = self
        self.clock = Clock()
        self.clock.advance(START)
        url = self.database_url()
        self.db = Database(url, None, runner=run_now)
        case.successResultOf(self.db.start())
        case.addCleanup(self.db.stop)

    def ok(self, d: Deferred[T]) -> T:
        case: Any = self
        result: T = case.successResultOf(d)
        return result

    def txn(self, txn: Any, *args: Any) -> Any:
        return self.ok(self.db.run(txn, *args))


class SequenceTests(DatabaseMixin, TestCase):
    def test_seq_is_dense_per_conversation_and_follows_the_batch(self) -> None:
        batch = [new(message(n)) for n in (5, 6)] + [new(message(7, "carol", "bob"))]
        placed = self.txn(append_txn, batch)
        self.assertEqual(
            {i: (p.conversation, p.seq, p.new) for i, p in placed.items()},
            {5: (AB, 1, True), 6: (AB, 2, True), 7: ("d:bob:carol", 1, True)},
        )
        placed = self.txn(append_txn, [new(message(n)) for n in (8, 9, 10)])
        self.assertEqual([placed[n].seq for n in (8, 9, 10)], [3, 4, 5])

    def test_a_rolled_back_batch_uses_no_number(self) -> None:
        self.txn(append_txn, [new(message(1))])

        def append_then_fail(connection: Any) -> None:
            append_txn(connection, [new(message(2)), new(message(3))])
            raise RuntimeError("the batch fails after numbering")

        self.failureResultOf(self.db.run(append_then_fail), RuntimeError)
        placed = self.txn(append_txn, [new(message(4))])
        self.assertEqual(placed[4].seq, 2)
        last = self.txn(
            lambda c: c.execute(select(conversations.c.last_seq)).scalar_one()  # type: ignore[no-any-return]
        )
        self.assertEqual(last, 2)

    def test_a_resend_is_found_by_id_and_by_client_sequence(self) -> None:
        self.txn(append_txn, [new(message(1, client_seq=70))])
        again = self.txn(append_txn, [new(message(1, client_seq=70))])
        self.assertEqual((again[1].msg_id, again[1].seq, again[1].new), (1, 1, False))
        # The state store lost the receipt: a new id, the same sender, device and seq.
        lost = self.txn(append_txn, [new(message(99, client_seq=70))], START - 600)
        self.assertEqual((lost[99].msg_id, lost[99].seq, lost[99].new), (1, 1, False))
        # Another device's client_seq 70 is another message.
        other = self.txn(append_txn, [new(message(100, client_seq=70), device="laptop")])
        self.assertEqual((other[100].seq, other[100].new), (2, True))
        # Outside the dedup window a client sequence is not looked for.
        late = self.txn(append_txn, [new(message(101, client_seq=70))], START + 1)
        self.assertEqual((late[101].seq, late[101].new), (3, True))
        # One batch carrying the same message twice appends it once.
        twice = self.txn(append_txn, [new(message(102)), new(message(102))])
        self.assertEqual(twice[102].seq, 4)
        count = self.txn(
            lambda c: c.execute(select(func.count()).select_from(timeline)).scalar_one()  # type: ignore[no-any-return]
        )
        self.assertEqual(count, 4)

    def test_a_group_message_to_500_members_is_one_row(self) -> None:
        members = [f"m{n:03d}" for n in range(500)]
        self.txn(group_joined, GROUP, members)

        def rows(connection: Any) -> int:
            return sum(
                int(connection.execute(select(func.count()).select_from(table)).scalar_one())
                for table in (timeline, conversations, user_conversations, cursors)
            )

        before = self.txn(rows)
        self.txn(append_txn, [new(message(1, "m000", group=GROUP))])
        self.assertEqual(self.txn(rows) - before, 1)
        self.txn(append_txn, [new(message(n, "m001", group=GROUP)) for n in range(2, 12)])
        self.assertEqual(self.txn(rows) - before, 11)  # constant per message: one row

    def test_a_first_message_makes_both_users_readers(self) -> None:
        self.txn(append_txn, [new(message(1))])
        readers = self.txn(
            lambda c: sorted(
                tuple(r)
                for r in c.execute(
                    select(
                        user_conversations.c.user_name,
                        user_conversations.c.peer,
                        user_conversations.c.floor_seq,
                    )
                )
            )
        )
        self.assertEqual(readers, [("alice", "bob", 0), ("bob", "alice", 0)])


class CursorTests(DatabaseMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.txn(append_txn, [new(message(n)) for n in range(1, 6)])

    def point(self, user: str = "bob", device: str = "phone") -> int:
        [state] = self.txn(summary_txn, user, device)
        return int(state.cursor)

    def test_cursors_move_forward_only_and_never_past_the_end(self) -> None:
        self.assertEqual(self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 3)]), 1)
        self.assertEqual(self.point(), 3)
        self.assertEqual(self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 2)]), 0)
        self.assertEqual(self.point(), 3)
        self.assertEqual(self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 99)]), 1)
        self.assertEqual(self.point(), 5)

    def test_cursors_are_per_device(self) -> None:
        self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 4)])
        self.assertEqual(self.point("bob", "phone"), 4)
        # The laptop is new to bob's account: it starts at the present (5), not at 4.
        self.assertEqual(self.point("bob", "laptop"), 5)
        self.txn(append_txn, [new(message(6))])
        self.assertEqual(self.point("bob", "phone"), 4)
        self.assertEqual(self.point("bob", "laptop"), 5)

    def test_the_accounts_first_device_keeps_what_waited_for_the_user(self) -> None:
        """Nothing was ever read by bob: his devices see all 5 as unread. Once one of
        them has read, a device new to the account sees none of them (issue #15)."""
        [first] = self.txn(summary_txn, "bob", "phone")
        self.assertEqual((first.cursor, first.unread), (0, 5))
        [second] = self.txn(summary_txn, "bob", "web")
        self.assertEqual((second.cursor, second.unread), (0, 5))
        self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 3)])
        self.assertTrue(self.txn(enrol_device_txn, "bob", "pad"))
        [third] = self.txn(summary_txn, "bob", "pad")
        self.assertEqual((third.cursor, third.unread), (5, 0))
        self.assertFalse(self.txn(enrol_device_txn, "bob", "pad"))  # known now
        [second] = self.txn(summary_txn, "bob", "web")
        self.assertEqual((second.cursor, second.unread), (0, 5))  # enrolled before
        # The new one can still page back through what came before it.
        page = self.txn(conversation_page_txn, AB, None, 0, 10)
        self.assertEqual([r.seq for r in page.records], [5, 4, 3, 2, 1])
        self.assertEqual(self.txn(unread_page_txn, "bob", "pad", None, None, 10).records, ())

    def test_a_device_that_read_before_enrolment_is_not_moved(self) -> None:
        self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 2)])
        self.txn(move_cursors_txn, [CursorMove("bob", "web", AB, 1)])
        self.assertFalse(self.txn(enrol_device_txn, "bob", "web"))
        self.assertEqual(self.point("bob", "web"), 1)

    def test_a_batch_enrols_its_devices_before_it_moves_cursors(self) -> None:
        """The node's cursor batch (``enrol_and_move_txn``): the pad, new to bob's
        account after the phone has read, starts at the present even with a move of its
        own in the same batch (taken as known because of it, it would stay at 1)."""
        self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 3)])
        moved = self.txn(
            enrol_and_move_txn,
            [("bob", "pad"), ("bob", "tv")],
            [CursorMove("bob", "pad", AB, 1), CursorMove("bob", "phone", AB, 4)],
        )
        self.assertEqual(moved, 1)  # the phone's; the pad is at 5 already
        # Asked before any read (a summary enrols too): the batch enrolled the tv.
        self.assertFalse(self.txn(enrol_device_txn, "bob", "tv"))
        self.assertEqual(
            (self.point("bob", "pad"), self.point("bob", "tv"), self.point("bob", "phone")),
            (5, 5, 4),
        )
        self.assertEqual(self.txn(enrol_and_move_txn, [("bob", "tv")], []), 0)

    def test_only_the_users_own_conversations(self) -> None:
        moved = self.txn(
            move_cursors_txn,
            [CursorMove("carol", "phone", AB, 3), CursorMove("bob", "phone", "d:x:y", 1)],
        )
        self.assertEqual(moved, 0)
        self.assertEqual(self.txn(lambda c: c.execute(select(cursors)).all()), [])

    def test_one_batch_of_many_users_and_devices_counts_only_what_moved(self) -> None:
        """A batch as a group's acks make it: many users and devices, one read each way
        and one upsert; a cursor already past its move stays and is not counted."""
        self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 4)])
        moves = [
            CursorMove("alice", "phone", AB, 2),
            CursorMove("alice", "web", AB, 5),
            CursorMove("bob", "phone", AB, 3),  # behind: no move
            CursorMove("bob", "web", AB, 9),  # past the end: to 5
            CursorMove("carol", "phone", AB, 5),  # not hers
        ]
        self.assertEqual(self.txn(move_cursors_txn, moves), 3)
        self.assertEqual(self.point("alice", "phone"), 2)
        self.assertEqual(self.point("alice", "web"), 5)
        self.assertEqual(self.point("bob", "phone"), 4)
        self.assertEqual(self.point("bob", "web"), 5)

    def test_many_moves_of_one_cursor_keep_the_highest(self) -> None:
        moves = [CursorMove("bob", "phone", AB, n) for n in (2, 4, 3)]
        self.assertEqual(self.txn(move_cursors_txn, moves), 1)
        self.assertEqual(self.point(), 4)


class PageTests(DatabaseMixin, TestCase):
    def test_unread_pages_of_one_conversation_newest_first_without_gaps(self) -> None:
        self.txn(append_txn, [new(message(n)) for n in range(1, 26)])
        self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 5)])
        seqs: list[int] = []
        before = None
        for _ in range(10):
            page = self.txn(unread_page_txn, "bob", "phone", AB, before, 7)
            seqs.extend(r.seq for r in page.records)
            if not page.more:
                break
            before = page.next_before
        self.assertEqual(seqs, list(range(25, 5, -1)))

    def test_unread_across_conversations_by_message_id(self) -> None:
        batch = [new(message(n, sender=f"s{n % 3}")) for n in range(1, 31)]
        self.txn(append_txn, batch)
        self.txn(
            move_cursors_txn, [CursorMove("bob", "phone", direct_conversation("s0", "bob"), 5)]
        )
        ids: list[int] = []
        before = None
        for _ in range(10):
            page = self.txn(unread_page_txn, "bob", "phone", None, before, 8)
            ids.extend(r.msg_id for r in page.records)
            if not page.more:
                break
            before = page.next_before
        # s0's first five (ids 3, 6, 9, 12, 15) were read on this device.
        self.assertEqual(ids, [n for n in range(30, 0, -1) if not (n % 3 == 0 and n <= 15)])

    def test_pages_are_bounded_in_bytes_and_a_large_message_comes_alone(self) -> None:
        self.txn(append_txn, [new(message(n, text="x" * 1000)) for n in range(1, 11)])
        self.txn(append_txn, [new(message(11, text="y" * 5000))])
        page = self.txn(unread_page_txn, "bob", "phone", AB, None, 100, 3000)
        self.assertEqual([r.seq for r in page.records], [11])
        page = self.txn(unread_page_txn, "bob", "phone", AB, 11, 100, 3000)
        self.assertEqual([r.seq for r in page.records], [10, 9])
        self.assertLessEqual(sum(len(r.payload) for r in page.records), 3000)

    def test_history_reads_by_seq_after_and_before_whatever_the_cursor(self) -> None:
        self.txn(append_txn, [new(message(n)) for n in range(1, 21)])
        self.txn(move_cursors_txn, [CursorMove("bob", "phone", AB, 20)])
        gap = self.txn(conversation_page_txn, AB, 15, 11, 100)  # the gap (11, 15)
        self.assertEqual([r.seq for r in gap.records], [14, 13, 12])
        self.assertFalse(gap.more)
        newest = self.txn(conversation_page_txn, AB, None, 0, 5)
        self.assertEqual(
            ([r.seq for r in newest.records], newest.next_before), ([20, 19, 18, 17, 16], 16)
        )

    def test_a_new_member_does_not_inherit_old_unread_and_a_leaver_reads_nothing(self) -> None:
        self.txn(group_joined, GROUP, ["alice", "bob"])
        self.txn(append_txn, [new(message(n, group=GROUP)) for n in range(1, 4)])
        self.txn(group_joined, GROUP, ["carol"])
        self.txn(append_txn, [new(message(4, group=GROUP))])
        carol = self.txn(unread_page_txn, "carol", "phone", None, None, 100)
        self.assertEqual([r.seq for r in carol.records], [4])
        self.txn(group_left, GROUP, ["bob"])
        self.assertEqual(self.txn(summary_txn, "bob", "phone"), [])

    def test_purge_is_bounded_oldest_first_and_numbers_stay_used(self) -> None:
        # Ids as a node gives them: a second apart, each the first of its millisecond.
        now = START
        ids = [first_id_at(int((now + n) * 1000)) + 7 for n in range(1, 6)]
        self.txn(
            append_txn,
            [new(message(i, sent_at=now + n, client_seq=n)) for n, i in enumerate(ids, 1)],
        )
        self.assertEqual(self.txn(purge_timeline_txn, now + 4, 2), 2)
        self.assertEqual(self.txn(purge_timeline_txn, now + 4, 2), 1)
        self.assertEqual(self.txn(purge_timeline_txn, now + 4, 2), 0)
        left = self.txn(conversation_page_txn, AB, None, 0, 10)
        self.assertEqual([r.msg_id for r in left.records], [ids[4], ids[3]])
        placed = self.txn(append_txn, [new(message(ids[4] + 1, client_seq=9))])
        self.assertEqual(placed[ids[4] + 1].seq, 6)


class SummaryTests(DatabaseMixin, TestCase):
    def test_ten_thousand_messages_in_fifty_conversations_are_one_frame(self) -> None:
        """Acceptance 5 (server half): one summary frame with 50 entries; pulling
        everything brings each message once, 10,000 in all."""
        batch = [
            new(message(n, sender=f"friend{n % 50:02d}", text=f"text {n} " + "z" * 40))
            for n in range(1, 10_001)
        ]
        for start in range(0, len(batch), 2000):
            self.txn(append_txn, batch[start : start + 2000])
        states = self.txn(summary_txn, "bob", "phone")
        frame = summary_frame(states, 65536 - 256, 7)
        self.assertEqual(len(frame.conversations), 50)
        self.assertEqual(frame.total, 10_000)
        self.assertFalse(frame.more)
        self.assertEqual(frame.request_id, 7)
        self.assertLess(frame.ByteSize(), 65536 - 256)
        self.assertEqual({c.count for c in frame.conversations}, {200})
        newest = [c.newest.id for c in frame.conversations]
        self.assertEqual(newest, sorted(newest, reverse=True))  # newest activity first
        self.assertEqual(newest[0], 10_000)
        pulled: list[int] = []
        before = None
        for _ in range(200):
            page = self.txn(unread_page_txn, "bob", "phone", None, before, 1000, 65280)
            pulled.extend(r.msg_id for r in page.records)
            if not page.more:
                break
            before = page.next_before
        self.assertEqual(sorted(pulled), list(range(1, 10_001)))

    def test_a_small_frame_cuts_texts_then_leaves_out_the_oldest(self) -> None:
        self.txn(
            append_txn, [new(message(n, sender=f"f{n}", text="t" * 500)) for n in range(1, 11)]
        )
        self.txn(append_txn, [new(message(11, sender="bob", to="zed"))])
        self.txn(move_cursors_txn, [CursorMove("bob", "phone", "d:bob:zed", 1)])
        states = self.txn(summary_txn, "bob", "phone")
        roomy = summary_frame(states, 65000, 1)
        self.assertEqual(len(roomy.conversations), 10)
        self.assertEqual([(c.conversation, c.seq) for c in roomy.caught_up], [("d:bob:zed", 1)])
        self.assertFalse(any(c.newest_cut for c in roomy.conversations))
        cut = summary_frame(states, 2000, 1)
        self.assertTrue(all(c.newest_cut and len(c.newest.text) <= 64 for c in cut.conversations))
        self.assertLessEqual(cut.ByteSize(), 2000)
        tight = summary_frame(states, 600, 1)
        self.assertTrue(tight.more)
        self.assertLessEqual(tight.ByteSize(), 600)
        self.assertEqual(tight.conversations[0].newest.id, 10)


class TimelinesTests(DatabaseMixin, TestCase):
    """The group commit of cim.history.timeline.Timelines."""

    def timelines(self, **settings: Any) -> Timelines:
        values: dict[str, Any] = {"batch_size": 3, "batch_wait": 0.01, **settings}
        return Timelines(self.db, self.clock, TimelineSettings(**values))

    def test_appends_wait_for_a_batch_then_fire_with_their_seq(self) -> None:
        timelines = self.timelines()
        first = timelines.append(message(1), "phone")
        second = timelines.append(message(2), "phone")
        self.assertNoResult(first)
        self.clock.advance(0.01)
        self.assertEqual((self.ok(first).seq, self.ok(second).seq), (1, 2))
        batch = [timelines.append(message(n), "phone") for n in (3, 4, 5)]
        self.assertEqual([self.ok(d).seq for d in batch], [3, 4, 5])  # a full batch: at once

    def test_a_failing_database_refuses_at_once_and_keeps_no_promise(self) -> None:
        timelines = self.timelines(batch_size=1)
        real = self.db.run

        def down(*args: Any, **kwargs: Any) -> Deferred[Any]:
            return fail(OperationalError("INSERT", {}, Exception("connection refused")))

        self.db.run = down  # type: ignore[method-assign]
        refused = timelines.append(message(1), "phone")
        self.failureResultOf(refused, TimelineUnavailable)
        self.failureResultOf(timelines.append(message(2), "phone"), TimelineUnavailable)
        self.assertGreater(timelines.behind(), 0)
        self.db.run = real  # type: ignore[method-assign]
        self.clock.advance(30)  # the writer's retry of the first message commits
        self.assertEqual(timelines.behind(), 0.0)
        # The sender's resend (same id) finds it: not appended twice.
        again = self.ok(timelines.append(message(1), "phone"))
        self.assertEqual((again.seq, again.new), (1, False))

    def test_a_message_the_database_refuses_fails_alone(self) -> None:
        timelines = self.timelines()
        bad = message(3)
        good = [timelines.append(message(n), "phone") for n in (1, 2)]
        refused = timelines.append(bad, "x" * 65)
        self.failureResultOf(refused, ValueError)
        self.clock.advance(0.01)
        self.assertEqual([self.ok(d).seq for d in good], [1, 2])

    def test_a_full_backlog_holds_new_messages_back(self) -> None:
        timelines = self.timelines(batch_size=100, batch_wait=5.0, max_backlog=4)
        waiting = [timelines.append(message(n), "phone") for n in range(1, 5)]
        self.assertGreater(timelines.behind(), 0)
        self.clock.advance(5)
        self.assertEqual([self.ok(d).seq for d in waiting], [1, 2, 3, 4])
        self.assertEqual(timelines.behind(), 0.0)

    def test_ack_cursor_moves_are_batched(self) -> None:
        timelines = self.timelines(batch_size=1)
        for n in range(1, 4):
            self.ok(timelines.append(message(n), "phone"))
        timelines.move_cursor("bob", "phone", AB, 1)
        timelines.move_cursor("bob", "phone", AB, 3)
        self.clock.advance(1)
        [state] = self.ok(timelines.summary("bob", "phone"))
        self.assertEqual((state.cursor, state.unread), (3, 0))

    def test_stop_writes_what_was_taken(self) -> None:
        timelines = self.timelines(batch_wait=10)
        taken = timelines.append(message(1), "phone")
        self.ok(timelines.stop())
        self.assertEqual(self.ok(taken).seq, 1)

    def test_the_purge_runs_on_its_interval(self) -> None:
        timelines = self.timelines(batch_size=1, retention_days=1.0, purge_interval=3600.0)
        old = first_id_at(int((START - 2 * 86400) * 1000))
        recent = first_id_at(int(START * 1000))
        self.ok(timelines.append(message(old, sent_at=START - 2 * 86400, client_seq=1), "phone"))
        self.ok(timelines.append(message(recent, sent_at=START, client_seq=2), "phone"))
        timelines.start()
        self.addCleanup(timelines.stop)
        page = self.ok(timelines.conversation_page(AB, None, 0, 10, 65000))
        self.assertEqual([r.msg_id for r in page.records], [recent])


class _MigratedPostgresql:
    """One scratch PostgreSQL database at head for the classes below, emptied of
    timelines before each test: migrating one per test costs seconds."""

    url: str | None = None

    def database_url(self) -> str:
        cls = _MigratedPostgresql
        if cls.url is None:
            holder = _Holder()
            cls.url = scratch_postgresql_url(holder)  # type: ignore[arg-type]
            upgrade(cls.url)
            atexit.register(holder.drop)
        url = cls.url
        engine = create_engine_for(url, pool_size=1)
        try:
            with engine.begin() as connection:
                for table in (cursors, user_conversations, timeline, conversations):
                    connection.execute(table.delete())
        finally:
            engine.dispose()
        return url


class _Holder:
    """Stands in for the test that owns the shared scratch database: drops it at exit."""

    def __init__(self) -> None:
        self._cleanups: list[Any] = []

    def addCleanup(self, cleanup: Any) -> None:
        self._cleanups.append(cleanup)

    def fail(self, reason: str) -> None:
        raise AssertionError(reason)

    def drop(self) -> None:
        for cleanup in reversed(self._cleanups):
            cleanup()


class PostgresqlSequenceTests(_MigratedPostgresql, SequenceTests):
    pass


class PostgresqlCursorTests(_MigratedPostgresql, CursorTests):
    pass


class PostgresqlPageTests(_MigratedPostgresql, PageTests):
    pass


class TwoWritersTests(TestCase):
    """Two nodes (two ``Database`` objects: two engines, two connections) append to one
    conversation at once on PostgreSQL, each from its own thread: the row lock
    serialises them, numbers are dense and never given twice."""

    timeout = 60

    def test_two_writers_never_share_or_skip_a_number(self) -> None:
        url = scratch_postgresql_url(self)
        upgrade(url)
        databases = [Database(url, None, runner=run_now) for _ in range(2)]
        for db in databases:
            self.successResultOf(db.start())
            self.addCleanup(db.stop)
        placed: list[int] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def writer(index: int) -> None:
            try:
                for round_ in range(40):
                    base = 1 + (index * 1000 + round_) * 5
                    batch = [new(message(base + k, client_seq=base + k)) for k in range(5)]
                    outcome: list[Any] = []
                    databases[index].run(append_txn, batch).addBoth(outcome.append)
                    if not isinstance(outcome[0], dict):
                        outcome[0].raiseException()
                    result = outcome[0]
                    with lock:
                        placed.extend(p.seq for p in result.values())
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(50)
        self.assertEqual(errors, [])
        self.assertEqual(sorted(placed), list(range(1, 401)))
