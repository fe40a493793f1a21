"""cim.logic.contacts and cim.storage.contacts: requests, acceptance, blocks, settings,
the rule of who may message whom, its remembered answers, and the 0007 migration.

The database is a SQLite file run inline (``CountingRunner``: a database hit is one
run); tests/integration/test_contacts_postgresql.py runs the same tests on
PostgreSQL. The node's side (CONTACTS_R, msg:R refusals, ONLINE_R) is
tests/unit/test_contacts_node.py; group invitations tests/unit/test_group_invites.py.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from sqlalchemy import insert, select, text
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cim.logic.contacts import ContactBook
from cim.logic.contacts_cache import Decisions
from cim.logic.errors import BadInput, Conflict, Forbidden, LogicError, NotFound
from cim.storage.accounts import delete_user_txn, insert_user_txn
from cim.storage.contacts import (
    CONTACTS,
    EVERYONE,
    NOBODY,
    PrivacyDefaults,
    Standing,
    insert_missing,
    may_message,
    standings_txn,
)
from cim.storage.database import Database, create_engine_for, head_revision, upgrade
from cim.storage.profiles import delete_account_txn
from cim.storage.schema import bindings, blocks, contact_requests, contacts, group_invites
from tests.unit.test_groups import CountingRunner
from tests.unit.test_storage import QueuedRunner, sqlite_url

T = TypeVar("T")
START = 1_700_000_000.0
PEOPLE = ("alice", "bob", "carol", "mum", "dad", "stranger")
WATCH = "watch"


class RecordingNotices:
    """An Announcer that keeps what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], str, dict[str, Any]]] = []

    async def send(
        self, receivers: Iterable[str], event: str, urgent: bool = False, **fields: Any
    ) -> list[str]:
        names = sorted(receivers)
        self.sent.append((names, event, fields))
        return names

    def events(self, receiver: str) -> list[tuple[str, dict[str, Any]]]:
        return [(event, fields) for names, event, fields in self.sent if receiver in names]


def people_txn(connection: Connection, names: Iterable[str], kind: str = "person") -> None:
    for name in names:
        insert_user_txn(connection, name, "scrypt$not-a-real-hash", kind, 1.0)


def bind_txn(connection: Connection, device: str, guardian: str, status: str = "active") -> None:
    connection.execute(
        insert(bindings).values(
            device=device,
            guardian=guardian,
            status=status,
            created_at=START,
            approved_by=None,
            approved_at=START if status == "active" else None,
        )
    )


class ContactsMixin:
    """alice, bob, carol, mum, dad and stranger are persons; watch is a device whose
    active guardian is mum (dad's binding is pending)."""

    defaults = PrivacyDefaults()

    def database_url(self) -> str:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.runner = CountingRunner()
        self.db = Database(self.database_url(), None, runner=self.runner)
        self.ok(self.db.start())
        case: Any = self
        case.addCleanup(self.db.stop)
        self.ok(self.db.run(people_txn, PEOPLE))
        self.ok(self.db.run(people_txn, [WATCH], "device"))
        self.ok(self.db.run(bind_txn, WATCH, "mum"))
        self.ok(self.db.run(bind_txn, WATCH, "dad", "pending"))
        self.notices = RecordingNotices()
        self.book = self.make_book()

    def make_book(self, **kwargs: Any) -> ContactBook:
        book = ContactBook(self.db, self.clock, self.defaults, **kwargs)
        book.notices = self.notices
        return book

    def ok(self, d: Deferred[T]) -> T:
        case: Any = self
        result: T = case.successResultOf(d)
        return result

    def act(self, work: Coroutine[Any, Any, T]) -> T:
        return self.ok(Deferred.fromCoroutine(work))

    def refused(self, work: Coroutine[Any, Any, Any], kind: type[LogicError], code: str) -> str:
        case: Any = self
        error = case.failureResultOf(Deferred.fromCoroutine(work), kind).value
        case.assertEqual(error.code, code)
        return str(error.message)

    def befriend(self, first: str, second: str, device: str | None = None) -> None:
        """``first`` (or its guardian mum, for the watch) asks, ``second`` accepts."""
        asker = "mum" if first == WATCH else first
        self.act(self.book.request(asker, second, WATCH if first == WATCH else None))
        answerer = "mum" if second == WATCH else second
        self.act(self.book.accept(answerer, first, WATCH if second == WATCH else None))

    def allowed(self, sender: str, receiver: str) -> bool:
        return self.ok(self.book.may_message(sender, receiver))

    def rows(self, table: Any) -> list[tuple[Any, ...]]:
        def read(connection: Connection) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in connection.execute(select(table)).all()]

        return self.ok(self.db.run(read))


class ContactRequestTests(ContactsMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def test_request_then_accept(self) -> None:
        self.assertEqual(self.act(self.book.request("alice", "bob")), "requested")
        self.assertEqual(
            self.notices.events("bob"),
            [("contact.requested", {"from": "alice", "to": "bob", "requested_by": "alice"})],
        )
        listed = self.act(self.book.contact_list("bob"))
        self.assertEqual([(p.user, p.at) for p in listed.incoming], [("alice", START)])
        self.assertEqual(self.act(self.book.contact_list("alice")).outgoing[0].user, "bob")
        self.clock.advance(5)
        self.assertEqual(self.act(self.book.accept("bob", "alice")), "accepted")
        for user, other in (("alice", "bob"), ("bob", "alice")):
            found = self.act(self.book.contact_list(user))
            self.assertEqual([(c.user, c.since) for c in found.contacts], [(other, START + 5)])
            self.assertEqual((found.incoming, found.outgoing), ([], []))
            self.assertIn(
                ("contact.added", {"account": user, "contact": other}), self.notices.events(user)
            )

    def test_asking_again_changes_nothing_and_tells_nobody_again(self) -> None:
        self.act(self.book.request("alice", "bob"))
        self.assertEqual(self.act(self.book.request("alice", "bob")), "requested")
        self.assertEqual(len(self.notices.sent), 1)
        self.befriend("alice", "carol")
        self.assertEqual(self.act(self.book.request("alice", "carol")), "accepted")

    def test_crossed_requests_make_a_contact(self) -> None:
        self.act(self.book.request("alice", "bob"))
        self.assertEqual(self.act(self.book.request("bob", "alice")), "accepted")
        self.assertEqual(
            [c.user for c in self.act(self.book.contact_list("alice")).contacts], ["bob"]
        )
        self.assertEqual(self.rows(contact_requests), [])

    def test_decline_is_silent(self) -> None:
        self.act(self.book.request("alice", "bob"))
        sent = len(self.notices.sent)
        self.assertEqual(self.act(self.book.decline("bob", "alice")), "declined")
        self.assertEqual(len(self.notices.sent), sent)
        self.assertEqual(self.act(self.book.contact_list("alice")).outgoing, [])
        self.refused(self.book.decline("bob", "alice"), NotFound, "not_found")
        self.refused(self.book.accept("bob", "alice"), NotFound, "not_found")

    def test_remove_ends_the_contact_for_both_and_withdraws_a_request(self) -> None:
        self.befriend("alice", "bob")
        self.assertEqual(self.act(self.book.remove("bob", "alice")), "removed")
        self.assertEqual(self.act(self.book.contact_list("alice")).contacts, [])
        self.assertEqual(self.rows(contacts), [])
        self.act(self.book.request("alice", "carol"))
        self.act(self.book.remove("alice", "carol"))
        self.assertEqual(self.act(self.book.contact_list("carol")).incoming, [])
        self.refused(self.book.remove("alice", "carol"), NotFound, "not_found")

    def test_bad_requests(self) -> None:
        self.refused(self.book.request("alice", "alice"), BadInput, "bad_request")
        self.refused(self.book.accept("alice", "no such name!"), BadInput, "bad_request")
        self.refused(self.book.block("alice", "alice"), BadInput, "bad_request")

    def test_a_name_without_an_account_and_a_block_get_one_answer(self) -> None:
        self.act(self.book.block("bob", "stranger"))
        ghost = self.refused(self.book.request("stranger", "ghost"), Forbidden, "not_accepted")
        blocked = self.refused(self.book.request("stranger", "bob"), Forbidden, "not_accepted")
        self.assertEqual(ghost.replace("ghost", "NAME"), blocked.replace("bob", "NAME"))
        invalid = self.refused(self.book.request("stranger", "-x"), Forbidden, "not_accepted")
        self.assertEqual(invalid.replace("-x", "NAME"), blocked.replace("bob", "NAME"))
        self.assertEqual(self.act(self.book.contact_list("bob")).incoming, [])


class DeviceContactTests(ContactsMixin, TestCase):
    """A watch's contacts are its active guardians' to choose."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_a_request_to_a_watch_goes_to_its_active_guardians(self) -> None:
        self.act(self.book.request("alice", WATCH))
        self.assertEqual(
            self.notices.sent,
            [
                (
                    ["mum"],
                    "contact.requested",
                    {"from": "alice", "to": WATCH, "requested_by": "alice"},
                )
            ],
        )
        waiting = self.act(self.book.contact_list("mum")).incoming
        self.assertEqual([(p.user, p.device) for p in waiting], [("alice", WATCH)])
        self.assertEqual(self.act(self.book.contact_list("dad")).incoming, [])  # pending binding
        self.assertEqual(self.act(self.book.contact_list("mum", WATCH)).incoming[0].user, "alice")

    def test_the_watch_cannot_accept_or_ask_for_itself(self) -> None:
        self.act(self.book.request("alice", WATCH))
        self.refused(self.book.accept(WATCH, "alice"), Forbidden, "forbidden")
        self.refused(self.book.request(WATCH, "bob"), Forbidden, "forbidden")
        self.assertFalse(self.allowed("alice", WATCH))

    def test_a_guardian_approves_and_the_watch_talks(self) -> None:
        self.act(self.book.request("alice", WATCH))
        self.assertEqual(self.act(self.book.accept("mum", "alice", WATCH)), "accepted")
        [contact] = self.act(self.book.contact_list(WATCH)).contacts
        self.assertEqual((contact.user, contact.approved_by), ("alice", "mum"))
        self.assertTrue(self.allowed("alice", WATCH))
        self.assertTrue(self.allowed(WATCH, "alice"))
        # The watch and its guardian hear of the new contact, and so does alice.
        for receiver in (WATCH, "mum", "alice"):
            self.assertIn("contact.added", [event for event, _ in self.notices.events(receiver)])

    def test_a_guardian_asks_for_the_watch(self) -> None:
        self.assertEqual(self.act(self.book.request("mum", "bob", WATCH)), "requested")
        [waiting] = self.act(self.book.contact_list("bob")).incoming
        self.assertEqual((waiting.user, waiting.requested_by), (WATCH, "mum"))
        self.act(self.book.accept("bob", WATCH))
        self.assertTrue(self.allowed(WATCH, "bob"))

    def test_only_active_guardians_act_for_a_device(self) -> None:
        for actor, device in (("dad", WATCH), ("alice", WATCH), ("mum", "alice"), ("mum", "ghost")):
            message = self.refused(self.book.request(actor, "bob", device), Forbidden, "forbidden")
            self.assertIn("not an active guardian", message)

    def test_the_watch_may_narrow_its_circle(self) -> None:
        self.befriend(WATCH, "alice")
        self.assertEqual(self.act(self.book.remove(WATCH, "alice")), "removed")
        self.assertEqual(self.act(self.book.block(WATCH, "stranger")), "blocked")
        self.assertFalse(self.allowed("alice", WATCH))

    def test_family_cannot_block_each_other(self) -> None:
        self.refused(self.book.block(WATCH, "mum"), Conflict, "conflict")
        self.refused(self.book.block("mum", WATCH), Conflict, "conflict")
        self.assertTrue(self.allowed(WATCH, "mum"))

    def test_a_devices_settings_are_fixed(self) -> None:
        settings = self.act(self.book.settings(WATCH))
        self.assertEqual((settings.messages, settings.group_adds), (CONTACTS, "guardians"))
        self.refused(self.book.change_settings(WATCH, EVERYONE), Forbidden, "forbidden")


class BlockTests(ContactsMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def test_a_block_ends_the_contact_the_requests_and_the_invitations(self) -> None:
        self.befriend("alice", "bob")
        self.act(self.book.request("carol", "alice"))
        self.act(self.book.request("alice", "carol"))  # accepted: they are contacts
        self.act(self.book.request("stranger", "alice"))

        def invite(connection: Connection) -> None:
            connection.execute(
                text("INSERT INTO groups (id, name, owner, created_at) VALUES ('g', 'g', 'bob', 1)")
            )
            connection.execute(
                insert(group_invites).values(
                    group_id="g", user_name="alice", invited_by="bob", created_at=1
                )
            )

        self.ok(self.db.run(invite))
        sent = len(self.notices.sent)
        self.assertEqual(self.act(self.book.block("alice", "bob")), "blocked")
        self.act(self.book.block("alice", "stranger"))
        self.assertEqual(len(self.notices.sent), sent)  # nobody is told
        found = self.act(self.book.contact_list("alice"))
        self.assertEqual([c.user for c in found.contacts], ["carol"])
        self.assertEqual((found.incoming, found.blocked), ([], ["bob", "stranger"]))
        self.assertEqual(self.rows(group_invites), [])
        self.assertFalse(self.allowed("bob", "alice"))
        self.assertTrue(self.allowed("alice", "bob"))  # a block is one way
        self.refused(self.book.request("bob", "alice"), Forbidden, "not_accepted")
        self.refused(self.book.request("alice", "bob"), Conflict, "conflict")

    def test_unblock_lifts_only_the_block(self) -> None:
        self.befriend("alice", "bob")
        self.act(self.book.block("alice", "bob"))
        self.assertEqual(self.act(self.book.unblock("alice", "bob")), "unblocked")
        self.assertEqual(self.rows(blocks), [])
        self.assertEqual(self.act(self.book.contact_list("alice")).contacts, [])
        self.assertTrue(self.allowed("bob", "alice"))  # the default policy is everyone
        self.refused(self.book.unblock("alice", "bob"), NotFound, "not_found")

    def test_blocking_twice_is_one_block(self) -> None:
        self.act(self.book.block("alice", "bob"))
        self.act(self.book.block("alice", "bob"))
        self.assertEqual(len(self.rows(blocks)), 1)
        self.refused(self.book.block("alice", "ghost"), NotFound, "not_found")


class RuleTests(ContactsMixin, TestCase):
    """may_message through the book, for every kind of pair."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_the_default_policy_lets_persons_talk(self) -> None:
        self.assertTrue(self.allowed("alice", "bob"))
        self.assertTrue(self.allowed("alice", "alice"))
        self.assertFalse(self.allowed("alice", "ghost"))
        self.assertFalse(self.allowed("alice", "not a name"))

    def test_a_contacts_policy_takes_contacts_only(self) -> None:
        settings = self.act(self.book.change_settings("bob", CONTACTS))
        self.assertEqual((settings.messages, settings.group_adds), (CONTACTS, CONTACTS))
        self.assertFalse(self.allowed("alice", "bob"))
        self.assertTrue(self.allowed("bob", "alice"))
        self.befriend("alice", "bob")
        self.assertTrue(self.allowed("alice", "bob"))

    def test_a_watch_talks_with_its_guardians_and_approved_contacts_only(self) -> None:
        self.assertTrue(self.allowed("mum", WATCH))
        self.assertTrue(self.allowed(WATCH, "mum"))
        for other in ("dad", "alice", "stranger"):
            self.assertFalse(self.allowed(other, WATCH), other)
            self.assertFalse(self.allowed(WATCH, other), other)

    def test_the_server_default_applies_until_a_person_chooses(self) -> None:
        self.defaults = PrivacyDefaults(messages=CONTACTS, group_adds=NOBODY)
        book = self.make_book()
        self.assertFalse(self.ok(book.may_message("alice", "bob")))
        settings = self.act(book.settings("bob"))
        self.assertEqual((settings.messages, settings.group_adds), (CONTACTS, NOBODY))
        self.act(book.change_settings("bob", EVERYONE))
        self.assertTrue(self.ok(book.may_message("alice", "bob")))

    def test_bad_settings(self) -> None:
        self.refused(self.book.change_settings("bob", "friends"), BadInput, "bad_request")
        self.refused(self.book.change_settings("bob", None, "all"), BadInput, "bad_request")
        self.refused(self.book.settings("ghost"), NotFound, "not_found")

    def test_the_rule_itself(self) -> None:
        def standing(**fields: Any) -> Standing:
            base: dict[str, Any] = {
                "of": "r",
                "other": "s",
                "other_kind": "person",
                "kind": "person",
                "messages": None,
                "group_adds": None,
                "contact": False,
                "blocked": False,
                "family": False,
            }
            return Standing(**(base | fields))

        everyone, only_contacts = PrivacyDefaults(), PrivacyDefaults(messages=CONTACTS)
        self.assertFalse(may_message(None, everyone))
        self.assertTrue(may_message(standing(), everyone))
        self.assertFalse(may_message(standing(), only_contacts))
        self.assertTrue(may_message(standing(messages=EVERYONE), only_contacts))
        self.assertTrue(may_message(standing(contact=True, messages=CONTACTS), everyone))
        self.assertFalse(may_message(standing(contact=True, blocked=True), everyone))
        self.assertFalse(may_message(standing(other_kind=None), everyone))
        self.assertFalse(may_message(standing(kind="device", messages=EVERYONE), everyone))
        self.assertFalse(may_message(standing(other_kind="device"), everyone))
        self.assertTrue(may_message(standing(kind="device", family=True), everyone))
        self.assertTrue(may_message(standing(kind="device", contact=True), everyone))

    def test_made_up_names_share_one_remembered_answer(self) -> None:
        names = [f"-{n}" + "x" * 5000 for n in range(50)]
        before = self.runner.runs
        self.assertEqual([self.allowed("alice", name) for name in names], [False] * 50)
        self.assertEqual((self.runner.runs - before, len(self.book.decisions)), (1, 1))

    def test_a_key_inserted_twice_is_one_row(self) -> None:
        row = {"user_name": "alice", "blocked": "bob", "created_at": START}
        self.assertEqual(self.ok(self.db.run(insert_missing, blocks, [row])), 1)
        self.assertEqual(self.ok(self.db.run(insert_missing, blocks, [row, row])), 0)
        self.assertEqual(len(self.rows(blocks)), 1)

    def test_one_statement_whether_the_name_exists_or_not(self) -> None:
        self.act(self.book.block("bob", "stranger"))
        counts = []
        for receiver in ("bob", "ghost", WATCH):
            self.book.forget(receiver)
            before = self.runner.runs
            self.assertFalse(self.allowed("stranger", receiver))
            counts.append(self.runner.runs - before)
        self.assertEqual(counts, [1, 1, 1])
        standings = self.ok(self.db.run(standings_txn, "stranger", ["bob", "ghost"]))
        self.assertEqual(list(standings), ["bob"])


class DecisionCacheTests(ContactsMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def test_answers_come_from_memory_until_a_change(self) -> None:
        self.assertTrue(self.allowed("alice", "bob"))
        runs = self.runner.runs
        for _ in range(5):
            self.assertTrue(self.allowed("alice", "bob"))
            self.assertIs(self.book.known("alice", "bob"), True)
        self.assertFalse(self.allowed("alice", "ghost"))
        self.assertIs(self.book.known("alice", "ghost"), False)
        self.assertEqual(self.runner.runs, runs + 1)
        self.act(self.book.block("bob", "alice"))
        self.assertIsNone(self.book.known("alice", "bob"))
        self.assertFalse(self.allowed("alice", "bob"))

    def test_every_change_drops_the_answers_it_touched(self) -> None:
        self.act(self.book.change_settings("bob", CONTACTS))
        self.assertFalse(self.allowed("alice", "bob"))
        self.act(self.book.request("alice", "bob"))
        self.assertIs(self.book.known("alice", "bob"), False)  # nothing changed yet
        self.act(self.book.accept("bob", "alice"))
        self.assertTrue(self.allowed("alice", "bob"))
        self.act(self.book.remove("alice", "bob"))
        self.assertFalse(self.allowed("alice", "bob"))
        self.act(self.book.change_settings("bob", EVERYONE))
        self.assertTrue(self.allowed("alice", "bob"))

    def test_answers_expire(self) -> None:
        other = self.make_book(cache_ttl=5.0)  # another node's book
        self.assertTrue(self.ok(other.may_message("alice", "bob")))
        self.act(self.book.block("bob", "alice"))
        self.clock.advance(3)
        self.assertTrue(other.known("alice", "bob"))  # from memory, not read again yet
        self.clock.advance(1)
        # Late in its life the answer still holds while it is read again (here at once).
        self.assertTrue(other.known("alice", "bob"))
        self.assertFalse(other.known("alice", "bob"))  # the new read saw the block
        self.assertFalse(self.ok(other.may_message("alice", "bob")))
        # Unused, an answer expires: the next question waits for a read.
        self.clock.advance(5)
        self.assertIsNone(other.known("alice", "bob"))

    def test_the_cache_is_bounded(self) -> None:
        book = self.make_book(cache_size=2)
        for receiver in ("bob", "carol", "mum"):
            self.ok(book.may_message("alice", receiver))
        self.assertEqual(len(book.decisions), 2)
        self.assertIsNone(book.known("alice", "bob"))
        self.assertTrue(book.known("alice", "mum"))


class DecisionReadTests(TestCase):
    """Decisions with reads held in a queue, to interleave them like a busy pool."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.reads: list[tuple[str, str, Deferred[bool]]] = []
        self.decisions = Decisions(self.clock, self.load, ttl=10.0)

    def load(self, sender: str, receiver: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.reads.append((sender, receiver, d))
        return d

    def test_questions_about_one_pair_share_one_read_and_keep_their_order(self) -> None:
        answered: list[tuple[int, bool]] = []
        for n in range(3):
            self.decisions.decide("a", "b").addCallback(lambda ok, n=n: answered.append((n, ok)))
        self.assertEqual(len(self.reads), 1)
        self.reads[0][2].callback(True)
        self.assertEqual(answered, [(0, True), (1, True), (2, True)])
        self.assertIs(self.decisions.known("a", "b"), True)

    def test_a_read_racing_a_change_is_not_kept(self) -> None:
        asked = self.decisions.decide("a", "b")
        self.decisions.forget("b")
        self.reads[0][2].callback(True)
        self.assertTrue(self.successResultOf(asked))
        self.assertIsNone(self.decisions.known("a", "b"))

    def test_a_failed_read_reaches_every_waiter_and_is_not_kept(self) -> None:
        first, second = self.decisions.decide("a", "b"), self.decisions.decide("a", "b")
        self.reads[0][2].errback(RuntimeError("database down"))
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(second, RuntimeError)
        self.assertIsNone(self.decisions.known("a", "b"))

    def test_an_answer_in_use_is_read_again_before_it_expires(self) -> None:
        # A pair that keeps talking never waits: late in its life the answer is read
        # again in the background, and holds until the new one comes.
        self.decisions.decide("a", "b")
        self.reads.pop()[2].callback(True)
        self.clock.advance(7)
        self.assertIs(self.decisions.known("a", "b"), True)
        self.assertEqual(self.reads, [])  # not yet in the last quarter of its life
        self.clock.advance(1)
        answered = self.decisions.decide("a", "b")
        self.assertTrue(self.successResultOf(answered))  # from memory, no wait
        self.assertEqual(len(self.reads), 1)  # and one read started
        self.assertIs(self.decisions.known("a", "b"), True)
        self.assertEqual(len(self.reads), 1)  # one at a time
        self.clock.advance(1)
        self.reads.pop()[2].callback(False)  # the rows changed meanwhile
        self.assertIs(self.decisions.known("a", "b"), False)
        self.clock.advance(6)  # 15 s after the first read, 7 s after the new one
        self.assertIs(self.decisions.known("a", "b"), False)
        self.assertEqual(self.reads, [])

    def test_an_answer_never_outlives_its_ttl(self) -> None:
        self.decisions.decide("a", "b")
        self.reads.pop()[2].callback(True)
        self.clock.advance(8)
        self.assertIs(self.decisions.known("a", "b"), True)  # starts a read
        self.reads.pop()[2].errback(RuntimeError("database down"))  # not kept
        self.clock.advance(2)
        self.assertIsNone(self.decisions.known("a", "b"))  # expired: no stale answer
        waiting = self.decisions.decide("a", "b")
        self.assertNoResult(waiting)
        self.reads.pop()[2].callback(True)
        self.assertTrue(self.successResultOf(waiting))

    def test_forget_drops_both_directions(self) -> None:
        for pair in (("a", "b"), ("b", "a"), ("c", "d")):
            self.decisions.decide(*pair)
        for _, _, d in self.reads:
            d.callback(True)
        self.decisions.forget("a")
        self.assertEqual(
            [self.decisions.known(*pair) for pair in (("a", "b"), ("b", "a"), ("c", "d"))],
            [None, None, True],
        )


class AccountDeletionTests(ContactsMixin, TestCase):
    """Deleting an account takes its contacts, requests, blocks and invitations."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_everything_naming_the_account_goes(self) -> None:
        self.befriend("alice", "bob")
        self.act(self.book.request("alice", "carol"))
        self.act(self.book.request("stranger", "alice"))
        self.act(self.book.block("alice", "stranger"))
        self.act(self.book.block("carol", "alice"))

        def groups_and_invitations(connection: Connection) -> None:
            connection.execute(
                text("INSERT INTO groups (id, name, owner, created_at) VALUES ('g', 'g', 'bob', 1)")
            )
            for user, by in (("alice", "bob"), ("carol", "alice")):
                connection.execute(
                    insert(group_invites).values(
                        group_id="g", user_name=user, invited_by=by, created_at=1
                    )
                )

        self.ok(self.db.run(groups_and_invitations))
        self.assertIsNotNone(self.ok(self.db.run(delete_account_txn, "alice", START)))
        for table in (contacts, contact_requests, blocks, group_invites):
            self.assertEqual([row for row in self.rows(table) if "alice" in row], [], table.name)
        self.assertEqual(self.rows(group_invites), [])

    def test_cimctl_deletion_too(self) -> None:
        self.befriend("alice", "bob")
        self.assertTrue(self.ok(self.db.run(delete_user_txn, "bob")))
        self.assertEqual(self.rows(contacts), [])


class MigrationTests(TestCase):
    """0007: existing 1:1 partners and group co-members become contacts on upgrade."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_existing_conversations_become_contacts(self) -> None:
        url = self.database_url()
        engine = create_engine_for(url)
        self.addCleanup(engine.dispose)
        from alembic import command

        from cim.storage.database import alembic_config

        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "0006_logic")
        with engine.begin() as connection:
            for name in ("ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal"):
                connection.execute(
                    text(
                        "INSERT INTO users (name, password_hash, kind, created_at) "
                        "VALUES (:n, 'x', 'person', 1)"
                    ),
                    {"n": name},
                )
            history = (
                "INSERT INTO history (conversation, msg_id, sender, receiver, group_id, "
                "sent_at, msg_type, payload) VALUES (:c, :i, :s, :r, :g, 1, 0, :p)"
            )
            # ann wrote to ben; cat to a deleted account; a group message of g1.
            connection.execute(
                text(history),
                {"c": "u:ann:ben", "i": 1, "s": "ann", "r": "ben", "g": None, "p": b"\0"},
            )
            connection.execute(
                text(history),
                {"c": "u:cat:gone", "i": 2, "s": "cat", "r": "gone", "g": None, "p": b"\0"},
            )
            connection.execute(
                text(history), {"c": "g:g1", "i": 3, "s": "fay", "r": None, "g": "g1", "p": b"\0"}
            )
            # dan has a stored message from eve; a system notice for cat.
            offline = (
                "INSERT INTO offline_msgs (receiver_uid, msg_id, send_time, sender_uid, "
                "msg_type, msg_content, group_id, payload) "
                "VALUES (:r, :i, 1, :s, 0, '', NULL, :p)"
            )
            connection.execute(text(offline), {"r": "dan", "i": 4, "s": "eve", "p": b"\0"})
            connection.execute(text(offline), {"r": "cat", "i": 5, "s": "@system", "p": b"\0"})
            # fay and gus share a live group; hal was in a dissolved one with fay.
            connection.execute(
                text(
                    "INSERT INTO groups (id, name, owner, created_at, dissolved_at) VALUES "
                    "('g1', 'live', 'fay', 1, NULL), ('g2', 'gone', 'hal', 1, 2)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO group_members (group_id, user_name, role, joined_at) VALUES "
                    "('g1', 'fay', 'owner', 1), ('g1', 'gus', 'member', 1), "
                    "('g2', 'hal', 'owner', 1), ('g2', 'ann', 'member', 1)"
                )
            )
        self.assertEqual(upgrade(url), ("0006_logic", head_revision()))
        with engine.connect() as connection:
            pairs = sorted(
                connection.execute(select(contacts.c.user_name, contacts.c.contact)).tuples()
            )
            approvals = set(connection.execute(select(contacts.c.approved_by)).scalars())
        self.assertEqual(
            pairs,
            [
                ("ann", "ben"),
                ("ben", "ann"),
                ("dan", "eve"),
                ("eve", "dan"),
                ("fay", "gus"),
                ("gus", "fay"),
            ],
        )
        self.assertEqual(approvals, {None})
        # ... and they keep talking under a contacts policy.
        db = Database(url, None, runner=CountingRunner())
        self.successResultOf(db.start())
        self.addCleanup(db.stop)
        book = ContactBook(db, Clock(), PrivacyDefaults(messages=CONTACTS))
        self.assertTrue(self.successResultOf(book.may_message("ann", "ben")))
        self.assertTrue(self.successResultOf(book.may_message("gus", "fay")))
        self.assertFalse(self.successResultOf(book.may_message("hal", "ann")))


class QueuedBookTests(ContactsMixin, TestCase):
    """A change that reports while a decision is being read: the read is not kept."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_a_block_during_a_read(self) -> None:
        queue = QueuedRunner()
        db = Database(self.database_url().replace("cim.db", "other.db"), None, runner=queue)
        started = db.start()
        queue.run_all()
        self.successResultOf(started)
        self.addCleanup(db.stop)
        d = db.run(people_txn, ("ann", "ben"))
        queue.run_all()
        self.successResultOf(d)
        book = ContactBook(db, self.clock, self.defaults)
        asked = book.may_message("ann", "ben")
        [(read, read_done)] = queue.queued
        queue.queued.clear()
        before = read()  # the read sees the rows before the block...
        blocked = Deferred.fromCoroutine(book.block("ben", "ann"))
        queue.run_all()
        self.successResultOf(blocked)
        read_done.callback(before)  # ...and reports after it
        self.assertTrue(self.successResultOf(asked))
        self.assertIsNone(book.known("ann", "ben"))
        again = book.may_message("ann", "ben")
        queue.run_all()
        self.assertFalse(self.successResultOf(again))
