"""cim.offline.store, cim.history.store and cim.storage.offline: offline messages, the
history archive, the purge.

The database runs synchronously through an injected runner (no reactor, no threads),
and time is a ``task.Clock``. The ``*Tests`` classes run on a temporary SQLite file;
their ``Postgresql*`` subclasses run the same tests on a scratch PostgreSQL database
(see ``tests.unit.test_storage`` for when those are skipped).
"""

from __future__ import annotations

import random
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cim.history.store import (
    HistoryForbidden,
    HistoryStore,
    conversation_of,
    direct_conversation,
    group_conversation,
    parse_conversation,
)
from cim.message_ids import MessageIdGenerator
from cim.offline.store import (
    MAX_PAGE_SIZE,
    OfflineFull,
    OfflineStore,
    SenderCount,
    message_of,
)
from cim.protocols import cim_pb2
from cim.storage.database import Database
from cim.storage.offline import (
    OfflineRecord,
    count_offline_txn,
    purge_history_txn,
    store_offline_txn,
)
from cim.storage.schema import history
from tests.unit.test_storage import run_now, sqlite_url

T = TypeVar("T")

START = 1_700_000_000.0
DAY = 86400.0
GROUP = "abcdefghijklmnopqrstuvwxyz"


def message(
    msg_id: int,
    sender: str = "alice",
    to: str = "bob",
    group: str = "",
    text: str | None = None,
    sent_at: float = START,
) -> cim_pb2.Message:
    m = cim_pb2.Message(
        id=msg_id,
        to="" if group else to,
        group=group,
        type=cim_pb2.TEXT,
        text=f"message {msg_id}" if text is None else text,
        sent_at_ms=int(sent_at * 1000),
        client_seq=msg_id,
    )
    setattr(m, "from", sender)  # "from" is a Python keyword
    return m


class DatabaseMixin:
    def database_url(self) -> str:
        raise NotImplementedError

    def setUp(self) -> None:
        case: Any = self
        self.clock = Clock()
        self.clock.advance(START)
        self.db = Database(self.database_url(), None, runner=run_now)
        case.successResultOf(self.db.start())
        case.addCleanup(self.db.stop)

    def ok(self, d: Deferred[T]) -> T:
        case: Any = self
        result: T = case.successResultOf(d)
        return result


class OfflineTests(DatabaseMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def setUp(self) -> None:
        super().setUp()
        self.store = OfflineStore(self.db, max_per_user=None)

    def ids(self, receiver: str = "bob") -> list[int]:
        page = self.ok(self.store.page(receiver, limit=MAX_PAGE_SIZE))
        return [r.msg_id for r in page.records]

    def test_pages_are_bounded_in_bytes_and_a_large_message_comes_alone(self) -> None:
        """Seen 1: a page of twenty 64 KB messages would not fit a client's frame."""
        bomb = "\U0001f4a3" * 16_000  # 64,000 bytes of UTF-8
        self.ok(self.store.store([message(i, text=bomb) for i in range(1, 4)]))
        self.ok(self.store.store([message(i) for i in range(4, 10)]))
        budget = 65_536 - 256
        pages: list[list[int]] = []
        before = None
        while True:
            page = self.ok(self.store.page("bob", before, limit=100, max_bytes=budget))
            pages.append([r.msg_id for r in page.records])
            self.assertLessEqual(sum(len(r.payload) + 6 for r in page.records), budget)
            if not page.more:
                break
            before = page.next_before
        self.assertEqual(pages, [[9, 8, 7, 6, 5, 4, 3], [2], [1]])
        # A budget below one message: each still travels, alone.
        tiny = self.ok(self.store.page("bob", limit=100, max_bytes=10))
        self.assertEqual(([r.msg_id for r in tiny.records], tiny.more), ([9], True))
        # Without a byte bound, the count alone decides (as before).
        self.assertEqual(len(self.ok(self.store.page("bob", limit=100)).records), 9)

    # --- writes -----------------------------------------------------------------------

    def test_store_keeps_the_message_faithfully(self) -> None:
        sent = message(7, text="hello\x00 world ✓")
        sent.media.url = "https://files/x"
        self.assertEqual(self.ok(self.store.store([sent])), 1)
        (record,) = self.ok(self.store.page("bob")).records
        self.assertEqual(
            (record.receiver, record.msg_id, record.sender, record.group_id),
            ("bob", 7, "alice", None),
        )
        # PostgreSQL text cannot hold NUL; the payload keeps the text as sent.
        self.assertEqual(record.content, "hello\ufffd world ✓")
        self.assertEqual(record.send_time, START)
        self.assertEqual(record.msg_type, cim_pb2.TEXT)
        self.assertEqual(message_of(record), sent)

    def test_store_twice_is_harmless(self) -> None:
        batch = [message(i) for i in (1, 2, 3)]
        self.assertEqual(self.ok(self.store.store(batch)), 3)
        self.assertEqual(self.ok(self.store.store(batch)), 0)
        self.assertEqual(self.ok(self.store.store([message(3), message(4)])), 1)
        self.assertEqual(self.ok(self.store.store([message(5), message(5)])), 1)
        self.assertEqual(self.ok(self.store.count("bob")), 5)
        self.assertEqual(self.ids(), [5, 4, 3, 2, 1])

    def test_group_copies_name_their_receivers(self) -> None:
        sent = message(9, group=GROUP)
        self.assertEqual(self.ok(self.store.store([("bob", sent), ("carol", sent)])), 2)
        self.assertEqual(self.ids("bob"), [9])
        self.assertEqual(self.ids("carol"), [9])
        (record,) = self.ok(self.store.page("carol")).records
        self.assertEqual(record.group_id, GROUP)
        self.assertEqual(message_of(record), sent)

    def test_store_refuses_malformed_messages(self) -> None:
        self.store_refused([message(0)])
        self.store_refused([message(1 << 63)])
        self.store_refused([message(1, to="")])
        self.store_refused([message(1, sender="")])
        self.store_refused([message(1), message(2, group=GROUP)])  # a group copy needs a receiver
        self.assertEqual(self.ok(self.store.count("bob")), 0)

    def store_refused(self, batch: list[Any]) -> None:
        self.failureResultOf(self.store.store(batch), ValueError)

    def test_send_time_falls_back_on_the_id(self) -> None:
        clock = Clock()
        clock.advance(1_710_000_000.25)  # cim.message_ids counts from 2024
        msg_id = MessageIdGenerator(clock, 1).next_id()
        self.ok(self.store.store([message(msg_id, sent_at=0)]))
        (record,) = self.ok(self.store.page("bob")).records
        self.assertEqual(record.send_time, 1_710_000_000.25)

    # --- the pull ---------------------------------------------------------------------

    def test_pages_newest_first_without_gaps_or_repeats(self) -> None:
        ids = list(range(1000, 1250))
        shuffled = ids[:]
        random.Random(5).shuffle(shuffled)
        senders = [f"user{i}" for i in range(20)]
        batch = [message(i, sender=senders[i % 20]) for i in shuffled]
        self.ok(self.store.store(batch[:100]))
        self.ok(self.store.store(batch[100:]))
        self.ok(self.store.store([message(1, to="carol")]))  # another receiver's

        seen: list[int] = []
        before = None
        pages = 0
        while True:
            page = self.ok(self.store.page("bob", before=before, limit=60))
            pages += 1
            seen.extend(r.msg_id for r in page.records)
            if not page.more:
                self.assertIsNone(page.next_before)
                break
            before = page.next_before
        self.assertEqual(pages, 5)
        self.assertEqual(seen, sorted(ids, reverse=True))
        self.assertEqual(self.ok(self.store.count("bob")), 250)  # reading deletes nothing

    def test_exact_page_boundary(self) -> None:
        self.ok(self.store.store([message(i) for i in range(1, 5)]))
        page = self.ok(self.store.page("bob", limit=4))
        self.assertFalse(page.more)
        self.assertEqual(len(page.records), 4)
        page = self.ok(self.store.page("bob", limit=2))
        self.assertTrue(page.more)
        self.assertEqual(page.next_before, 3)
        self.assertEqual(self.ok(self.store.page("nobody")).records, ())

    def test_pull_with_acknowledgements_empties_the_table(self) -> None:
        """The issue's flow: the next page acknowledges the one before, offlineack the last."""
        self.ok(self.store.store([message(i) for i in range(1, 24)]))
        received: list[int] = []
        page = self.ok(self.store.page("bob", limit=10))
        while True:
            received.extend(r.msg_id for r in page.records)
            acked = [r.msg_id for r in page.records]
            more, before = page.more, page.next_before
            if more:
                page = self.ok(self.store.page("bob", before=before, limit=10))
            self.assertEqual(self.ok(self.store.acknowledge("bob", acked)), len(acked))
            if not more:
                break
        self.assertEqual(received, list(range(23, 0, -1)))
        self.assertEqual(self.ok(self.store.count("bob")), 0)

    def test_unacknowledged_page_comes_again(self) -> None:
        self.ok(self.store.store([message(i) for i in range(1, 6)]))
        first = self.ok(self.store.page("bob", limit=3))
        again = self.ok(self.store.page("bob", limit=3))
        self.assertEqual(first, again)

    def test_page_limit_is_checked(self) -> None:
        self.failureResultOf(self.store.page("bob", limit=0), ValueError)
        self.failureResultOf(self.store.page("bob", limit=MAX_PAGE_SIZE + 1), ValueError)

    # --- acknowledgements -------------------------------------------------------------

    def test_acknowledge_deletes_only_the_receivers_messages(self) -> None:
        shared = message(50, group=GROUP)
        self.ok(self.store.store([("bob", shared), ("carol", shared)]))
        self.ok(self.store.store([message(51, to="carol"), message(52, to="bob")]))
        # carol cannot delete bob's copy, nor bob carol's message
        self.assertEqual(self.ok(self.store.acknowledge("bob", [51])), 0)
        self.assertEqual(self.ok(self.store.acknowledge("bob", [50, 50, 999])), 1)
        self.assertEqual(self.ids("bob"), [52])
        self.assertEqual(self.ids("carol"), [51, 50])
        self.assertEqual(self.ok(self.store.acknowledge("carol", [])), 0)

    def test_acknowledge_many(self) -> None:
        self.ok(self.store.store([message(i) for i in range(1, 1201)]))
        self.assertEqual(self.ok(self.store.acknowledge("bob", range(1, 1101))), 1100)
        self.assertEqual(self.ids(), list(range(1200, 1100, -1)))

    # --- summary ----------------------------------------------------------------------

    def test_summary_counts_per_sender(self) -> None:
        self.ok(
            self.store.store(
                [message(i, sender="alice") for i in (1, 2, 3)]
                + [message(i, sender="dave") for i in (4, 9)]
                + [("bob", message(5, sender="erin", group=GROUP))]
                + [message(6, sender="frank", to="carol")]
            )
        )
        self.assertEqual(
            self.ok(self.store.summary("bob")),
            [SenderCount("dave", 2, 9), SenderCount("erin", 1, 5), SenderCount("alice", 3, 3)],
        )
        self.assertEqual(self.ok(self.store.summary("nobody")), [])

    # --- the cap ----------------------------------------------------------------------

    def test_cap_refuses_the_message_that_would_exceed_it(self) -> None:
        store = OfflineStore(self.db, max_per_user=3)
        self.assertEqual(self.ok(store.store([message(i) for i in (1, 2, 3)])), 3)
        error = self.failureResultOf(store.store([message(4)]), OfflineFull).value
        self.assertEqual((error.receiver, error.receivers, error.limit), ("bob", ("bob",), 3))
        self.assertEqual(error.code, "offline_full")
        self.assertIn("'bob'", str(error))
        self.assertEqual(self.ids(), [3, 2, 1])
        # A retry of what is stored already is no new message: still fine when full.
        self.assertEqual(self.ok(store.store([message(3)])), 0)
        self.ok(store.acknowledge("bob", [1]))
        self.assertEqual(self.ok(store.store([message(4)])), 1)

    def test_uncapped_messages_are_stored_in_a_full_box(self) -> None:
        store = OfflineStore(self.db, max_per_user=1)
        self.ok(store.store([message(1)]))
        self.failureResultOf(store.store([message(2)]), OfflineFull)
        self.assertEqual(self.ok(store.store([message(2)], capped=False)), 1)
        self.assertEqual(self.ids(), [2, 1])

    def test_cap_refuses_the_whole_batch_and_names_who_is_full(self) -> None:
        store = OfflineStore(self.db, max_per_user=2)
        self.ok(store.store([message(1, to="carol"), message(2, to="dave")]))
        error = self.failureResultOf(
            store.store(
                [
                    message(3, to="bob"),
                    message(4, to="carol"),
                    message(5, to="dave"),
                    message(6, to="dave"),
                    message(7, to="erin"),
                ]
            ),
            OfflineFull,
        ).value
        self.assertEqual(error.receivers, ("dave",))
        self.assertEqual(error.receiver, "dave")
        for name, expected in (("bob", 0), ("carol", 1), ("dave", 1), ("erin", 0)):
            self.assertEqual(self.ok(store.count(name)), expected, name)

    def test_cap_counts_the_batch_itself(self) -> None:
        store = OfflineStore(self.db, max_per_user=3)
        self.failureResultOf(store.store([message(i) for i in range(1, 5)]), OfflineFull)
        self.assertEqual(self.ok(store.count("bob")), 0)

    def test_cap_must_be_positive(self) -> None:
        self.assertRaises(ValueError, OfflineStore, self.db, 0)

    def test_txn_functions_on_a_connection(self) -> None:
        """The consumer may call the transactions itself, inside its own transaction."""
        record = OfflineRecord("bob", 1, START, "alice", 0, "hi", None, b"\x08\x01")

        def txn(connection: Connection) -> tuple[int, int, int]:
            return (
                store_offline_txn(connection, [record], 5),
                store_offline_txn(connection, [record], 5),
                count_offline_txn(connection, "bob"),
            )

        self.assertEqual(self.ok(self.db.run(txn)), (1, 0, 1))


class HistoryTests(DatabaseMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def setUp(self) -> None:
        super().setUp()
        self.history = HistoryStore(self.db, retention_days=30, clock=self.clock)

    def read(self, reader: str, conversation: str, **kwargs: Any) -> list[int]:
        page = self.ok(self.history.page(reader, conversation, **kwargs))
        return [r.msg_id for r in page.records]

    # --- keys -------------------------------------------------------------------------

    def test_conversation_keys(self) -> None:
        self.assertEqual(direct_conversation("bob", "alice"), "u:alice:bob")
        self.assertEqual(direct_conversation("alice", "bob"), "u:alice:bob")
        self.assertEqual(group_conversation(GROUP), "g:" + GROUP)
        self.assertEqual(conversation_of(message(1, "bob", "alice")), "u:alice:bob")
        self.assertEqual(conversation_of(message(1, group=GROUP)), "g:" + GROUP)

    def test_names_with_colons_cannot_collide(self) -> None:
        one = direct_conversation("a:b", "c")
        other = direct_conversation("a", "b:c")
        self.assertNotEqual(one, other)
        self.assertEqual(parse_conversation(one).users, ("a:b", "c"))
        self.assertEqual(parse_conversation(other).users, ("a", "b:c"))
        tricky = direct_conversation("x%3Ay", "%")
        self.assertEqual(parse_conversation(tricky).users, ("%", "x%3Ay"))
        self.assertEqual(parse_conversation("g:" + GROUP).group_id, GROUP)
        self.assertEqual(parse_conversation("u:alice:alice").users, ("alice", "alice"))
        for bad in ("", "u:", "u:alice", "u:a:b:c", "u:bob:alice", "u::b", "g:", "x:a:b", "u:a%:b"):
            self.assertRaises(ValueError, parse_conversation, bad)

    # --- archive ----------------------------------------------------------------------

    def test_archive_is_idempotent_and_faithful(self) -> None:
        sent = message(3, sender="bob", to="alice")
        batch = [message(1), message(2, group=GROUP), sent]
        self.assertEqual(self.ok(self.history.archive(batch)), 3)
        self.assertEqual(self.ok(self.history.archive([*batch, sent])), 0)
        page = self.ok(self.history.page("alice", "u:alice:bob"))
        self.assertEqual([r.msg_id for r in page.records], [3, 1])
        newest = page.records[0]
        self.assertEqual(
            (newest.conversation, newest.sender, newest.receiver, newest.group_id),
            ("u:alice:bob", "bob", "alice", None),
        )
        self.assertEqual(newest.sent_at, START)
        self.assertEqual(message_of(newest), sent)
        group_page = self.ok(
            self.history.page("bob", "g:" + GROUP, is_group_member=lambda g, u: True)
        )
        (record,) = group_page.records
        self.assertEqual((record.receiver, record.group_id), (None, GROUP))

    def test_archive_refuses_malformed_messages(self) -> None:
        self.failureResultOf(self.history.archive([message(0)]), ValueError)
        self.failureResultOf(self.history.archive([message(1, to="")]), ValueError)
        self.failureResultOf(self.history.archive([message(1, sender="")]), ValueError)

    # --- pages ------------------------------------------------------------------------

    def test_history_pages_newest_first(self) -> None:
        ids = list(range(100, 237))
        shuffled = ids[:]
        random.Random(7).shuffle(shuffled)
        self.ok(
            self.history.archive(
                [message(i, *(("alice", "bob") if i % 2 else ("bob", "alice"))) for i in shuffled]
            )
        )
        self.ok(self.history.archive([message(i, "alice", "carol") for i in range(100, 110)]))
        seen: list[int] = []
        before = None
        while True:
            page = self.ok(self.history.page("bob", "u:alice:bob", before=before, limit=25))
            seen.extend(r.msg_id for r in page.records)
            if not page.more:
                break
            before = page.next_before
        self.assertEqual(seen, sorted(ids, reverse=True))
        self.assertEqual(self.read("alice", "u:alice:bob", before=103, limit=10), [102, 101, 100])
        self.assertEqual(self.read("alice", "u:alice:bob", before=100), [])
        self.failureResultOf(self.history.page("alice", "u:alice:bob", limit=0), ValueError)

    def test_only_participants_read_a_direct_conversation(self) -> None:
        self.ok(self.history.archive([message(1), message(2, "carol", "dave")]))
        self.assertEqual(self.read("alice", "u:alice:bob"), [1])
        self.assertEqual(self.read("bob", "u:alice:bob"), [1])
        error = self.failureResultOf(
            self.history.page("carol", "u:alice:bob"), HistoryForbidden
        ).value
        self.assertEqual(
            (error.reader, error.conversation, error.code), ("carol", "u:alice:bob", "forbidden")
        )
        self.failureResultOf(self.history.page("alice", "nonsense"), HistoryForbidden)
        self.failureResultOf(self.history.page("alice", "u:bob:alice"), HistoryForbidden)

    def test_only_members_read_a_group_conversation(self) -> None:
        self.ok(self.history.archive([message(i, group=GROUP) for i in (1, 2)]))
        members = {"alice", "bob"}
        asked: list[tuple[str, str]] = []

        def is_member(group_id: str, user: str) -> Deferred[bool]:
            asked.append((group_id, user))
            return succeed(user in members)

        key = group_conversation(GROUP)
        self.assertEqual(self.read("bob", key, is_group_member=is_member), [2, 1])
        self.failureResultOf(
            self.history.page("carol", key, is_group_member=is_member), HistoryForbidden
        )
        self.assertEqual(asked, [(GROUP, "bob"), (GROUP, "carol")])
        # a plain function will do, and without one nobody reads a group
        self.assertEqual(self.read("alice", key, is_group_member=lambda g, u: u in members), [2, 1])
        self.failureResultOf(self.history.page("alice", key), HistoryForbidden)

    def test_participates(self) -> None:
        self.assertTrue(self.ok(HistoryStore.participates("a:b", direct_conversation("a:b", "c"))))
        self.assertFalse(self.ok(HistoryStore.participates("a", direct_conversation("a:b", "c"))))

    # --- purge ------------------------------------------------------------------------

    def test_purge_deletes_what_is_older_than_the_retention(self) -> None:
        history = HistoryStore(self.db, retention_days=10, clock=self.clock, purge_batch=3)
        old = [message(i, sent_at=START - 20 * DAY + i) for i in range(1, 8)]
        young = [message(i, sent_at=START - 5 * DAY) for i in range(8, 11)]
        self.ok(history.archive(old + young))
        self.clock.advance(DAY)  # now START + 1 day: the old ones are 21 days old
        self.assertEqual(self.ok(history.purge_expired()), 7)
        self.assertEqual(self.read("alice", "u:alice:bob"), [10, 9, 8])
        self.assertEqual(self.ok(history.purge_expired()), 0)
        self.clock.advance(5 * DAY)
        self.assertEqual(self.ok(history.purge_expired()), 3)

    def test_purge_txn_is_bounded_and_oldest_first(self) -> None:
        self.ok(self.history.archive([message(i, sent_at=100.0 - i) for i in range(1, 6)]))
        self.assertEqual(self.ok(self.db.run(purge_history_txn, 1000.0, 2)), 2)

        def left_txn(connection: Connection) -> list[int]:
            return list(
                connection.execute(select(history.c.msg_id).order_by(history.c.msg_id)).scalars()
            )

        self.assertEqual(self.ok(self.db.run(left_txn)), [1, 2, 3])
        self.assertEqual(self.ok(self.db.run(purge_history_txn, 97.5, 10)), 1)  # id 3, at 97
        self.assertEqual(self.ok(self.db.run(left_txn)), [1, 2])

    def test_no_retention_keeps_everything(self) -> None:
        history = HistoryStore(self.db, retention_days=None, clock=self.clock)
        self.ok(history.archive([message(1, sent_at=0.001)]))
        self.assertEqual(self.ok(history.purge_expired()), 0)
        self.assertEqual(self.read("alice", "u:alice:bob"), [1])

    def test_bad_settings(self) -> None:
        self.assertRaises(ValueError, HistoryStore, self.db, 0, self.clock)
        self.assertRaises(ValueError, HistoryStore, self.db, 1, self.clock, purge_batch=0)
