"""The IM node's consent rules through the real ContactBook (issue #17, items 1 and 3).

A whole node on a fake clock (``NodeHarness``) with iosim clients, whose contact
rules, accounts and groups are the daemon's own on a SQLite file run inline;
tests/integration/test_contacts_postgresql.py runs them again on PostgreSQL and
tests/integration/test_contacts.py through a real daemon and cim-client.

- A stranger's message to a watch, and to a person whose policy is ``contacts``, is
  refused with ERROR ``FORBIDDEN``, exactly the answer for a name without an account,
  after the same number of database reads; once a request is accepted (for the watch:
  by its guardian) it is delivered; a blocked user's messages, requests and group
  invitations are refused with that same answer.
- ONLINE_R names only the caller's contacts and bound accounts.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from cim.accounts.store import AccountStore
from cim.config import parse_config
from cim.groups.directory import GroupDirectory
from cim.im.collaborators import NoContacts
from cim.im.contacts import ContactDirectory
from cim.im.direct import REASON_NOT_ACCEPTED
from cim.im.system import SYSTEM_SENDER
from cim.logic.contacts import ContactBook
from cim.logic.notices import Notices
from cim.protocols import cim_pb2
from cim.storage.contacts import PrivacyDefaults
from cim.storage.database import Database
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_contacts import PEOPLE, WATCH, bind_txn, people_txn
from tests.unit.test_delivery import settle
from tests.unit.test_groups import CountingRunner
from tests.unit.test_storage import sqlite_url

FORBIDDEN = cim_pb2.Error.FORBIDDEN
NO_RULES = NoContacts()


class ContactNodeMixin:
    """alice, bob, carol, mum, dad, stranger (persons) and watch (mum guards it)."""

    def database_url(self) -> str:
        raise NotImplementedError

    def setUp(self) -> None:
        case: Any = self
        self.runner = CountingRunner()
        self.db = Database(self.database_url(), None, runner=self.runner)
        case.successResultOf(self.db.start())
        case.addCleanup(self.db.stop)
        case.successResultOf(self.db.run(people_txn, PEOPLE))
        case.successResultOf(self.db.run(people_txn, [WATCH], "device"))
        case.successResultOf(self.db.run(bind_txn, WATCH, "mum"))
        self.node = NodeHarness()
        clock = self.node.clock
        self.book = ContactBook(self.db, clock, PrivacyDefaults())
        self.groups = GroupDirectory(self.db, clock)
        self.book.notices = self.groups.notices = Notices(self.node.im.system, clock)
        directory = self.node.im.directory
        directory.contacts = ContactDirectory(self.book)
        directory.groups = self.groups
        directory.user_exists = AccountStore(
            self.db, parse_config("[node]\nid = node1\n").accounts, reactor=clock
        ).exists
        self.next_request = 1

    # --- helpers --------------------------------------------------------------------------

    def send(self, client: ConnectedClient, to: str, seq: int, text: str = "hi") -> None:
        client.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to=to, text=text, client_seq=seq))
        settle(self.node)

    def ask(self, client: ConnectedClient, device: str = "", **op: Any) -> Any:
        """One CONTACTS_R; returns its CONTACTS_A."""
        request_id = self.next_request
        self.next_request += 1
        request = cim_pb2.ContactsRequest(request_id=request_id, device=device, **op)
        client.protocol.send(cim_pb2.CONTACTS_R, request)
        settle(self.node)
        [reply] = [
            a for a in client.events.of_type(cim_pb2.CONTACTS_A) if a.request_id == request_id
        ]
        return reply

    def group(self, client: ConnectedClient, **op: Any) -> Any:
        request_id = self.next_request
        self.next_request += 1
        client.protocol.send(cim_pb2.GROUP_R, cim_pb2.GroupRequest(request_id=request_id, **op))
        settle(self.node)
        [reply] = [a for a in client.events.of_type(cim_pb2.GROUP_A) if a.request_id == request_id]
        return reply

    def errors(self, client: ConnectedClient) -> dict[int, tuple[int, str, int]]:
        return {
            e.client_seq: (e.code, e.message, e.request_type)
            for e in client.events.of_type(cim_pb2.ERROR)
        }

    def outcomes(self, client: ConnectedClient) -> dict[int, tuple[int, str]]:
        return {a.client_seq: (a.status, a.reason) for a in client.events.of_type(cim_pb2.ACK_N)}

    def notices_for(self, user: str) -> list[dict[str, Any]]:
        case: Any = self
        # The node's own timelines (its database): the notices wait in @system's.
        page = case.successResultOf(
            self.node.timelines.unread_page(user, "phone", "", None, 1000, 1 << 20)
        )
        found = []
        for record in page.records:
            message = cim_pb2.Message.FromString(record.payload)
            if getattr(message, "from") == SYSTEM_SENDER:
                found.append(json.loads(message.text))
        return found

    def online(self, client: ConnectedClient) -> tuple[int, list[str]]:
        before = len(client.events.of_type(cim_pb2.ONLINE_A))
        client.protocol.send(cim_pb2.ONLINE_R, cim_pb2.OnlineR())
        settle(self.node)
        page = client.events.of_type(cim_pb2.ONLINE_A)[before]
        return page.total, list(page.users)


class MessageConsentTests(ContactNodeMixin, TestCase):
    """Acceptance 1."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_a_strangers_message_to_a_watch_is_refused_like_one_to_no_account(self) -> None:
        stranger = self.node.connect("stranger")
        watch = self.node.connect(WATCH, auto_ack=True)
        runs = []
        for seq, receiver in ((1, WATCH), (2, "ghost")):
            before = self.runner.runs
            self.send(stranger, receiver, seq)
            runs.append(self.runner.runs - before)
        errors = self.errors(stranger)
        self.assertEqual(errors[1], (FORBIDDEN, REASON_NOT_ACCEPTED, cim_pb2.MSG_R))
        self.assertEqual(errors[1], errors[2])
        self.assertEqual(runs, [1, 1])  # one read each: no extra round trip for either
        self.assertEqual(stranger.events.of_type(cim_pb2.MSG_A), [])
        self.assertEqual(stranger.events.of_type(cim_pb2.ACK_N), [])
        self.assertEqual(watch.events.of_type(cim_pb2.MSG_N), [])
        # Asked again, both are answered from memory, again alike and without a read.
        before = self.runner.runs
        self.send(stranger, WATCH, 3)
        self.send(stranger, "ghost", 4)
        self.assertEqual(self.runner.runs, before)
        self.assertEqual(self.errors(stranger)[3][:2], self.errors(stranger)[4][:2])

    def test_a_strangers_message_to_a_person_taking_contacts_only_is_refused_alike(self) -> None:
        bob = self.node.connect("bob", auto_ack=True)
        answer = self.ask(bob, settings=cim_pb2.PrivacySettings(messages="contacts"))
        self.assertEqual((answer.ok, answer.settings.messages), (True, "contacts"))
        stranger = self.node.connect("stranger", auto_ack=True)
        self.send(stranger, "bob", 1)
        self.send(stranger, "ghost", 2)
        errors = self.errors(stranger)
        self.assertEqual(errors[1], (FORBIDDEN, REASON_NOT_ACCEPTED, cim_pb2.MSG_R))
        self.assertEqual(errors[1], errors[2])
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        # bob may still write to the stranger (his policy is about what he receives).
        self.send(bob, "stranger", 1)
        self.assertEqual(self.outcomes(bob)[1][0], cim_pb2.DELIVERED)

    def test_once_a_guardian_approves_the_watch_gets_the_message(self) -> None:
        stranger = self.node.connect("stranger", auto_ack=True)
        mum = self.node.connect("mum")
        watch = self.node.connect(WATCH, auto_ack=True)
        self.send(stranger, WATCH, 1)
        self.assertEqual(self.errors(stranger)[1][0], FORBIDDEN)
        asked = self.ask(stranger, request=cim_pb2.ContactRef(user=WATCH))
        self.assertEqual((asked.ok, asked.status), (True, "requested"))
        # The request went to the watch's guardian, not to the watch.
        [notice] = self.notices_for("mum")
        self.assertEqual(
            (notice["event"], notice["from"], notice["to"]),
            ("contact.requested", "stranger", WATCH),
        )
        self.assertTrue(mum.events.of_type(cim_pb2.OFFLINE_NOTICE))
        self.assertEqual(self.notices_for(WATCH), [])
        # The watch cannot let anyone in itself.
        refused = self.ask(watch, accept=cim_pb2.ContactRef(user="stranger"))
        self.assertEqual((refused.ok, refused.error), (False, "forbidden"))
        listed = self.ask(mum, list=cim_pb2.ListContacts())
        self.assertEqual([(p.user, p.device) for p in listed.book.incoming], [("stranger", WATCH)])
        approved = self.ask(mum, device=WATCH, accept=cim_pb2.ContactRef(user="stranger"))
        self.assertEqual((approved.ok, approved.status), (True, "accepted"))
        self.send(stranger, WATCH, 2)
        self.assertEqual(self.outcomes(stranger)[2], (cim_pb2.DELIVERED, ""))
        self.assertEqual([m.text for m in watch.events.of_type(cim_pb2.MSG_N)], ["hi"])
        self.assertEqual(
            [c.user for c in self.ask(watch, list=cim_pb2.ListContacts()).book.contacts],
            ["stranger"],
        )

    def test_an_offline_receiver_the_consent_read_found_is_not_read_again(self) -> None:
        """The decision that let a message in read the receiver's account: storing
        it for an offline receiver reads nothing more. Rules that read no account
        leave routing to read it (and to fail a name without one)."""
        reads: list[str] = []
        exists = self.node.im.directory.user_exists

        def counted(name: str) -> Any:
            reads.append(name)
            return exists(name)

        self.node.im.directory.user_exists = counted
        alice = self.node.connect("alice")
        for seq in (1, 2, 3):
            self.send(alice, "carol", seq)
        self.assertEqual(self.outcomes(alice), {n: (cim_pb2.STORED, "") for n in (1, 2, 3)})
        self.assertEqual(reads, [])
        self.node.im.directory.contacts = NO_RULES  # rules that read no account
        self.send(alice, "carol", 4)
        self.assertEqual(self.outcomes(alice)[4], (cim_pb2.STORED, ""))
        self.assertEqual(reads, ["carol"])
        self.send(alice, "nobody", 5)
        self.assertEqual(self.outcomes(alice)[5], (cim_pb2.FAILED, "no such user"))

    def test_once_a_person_accepts_the_message_is_delivered(self) -> None:
        bob = self.node.connect("bob", auto_ack=True)
        self.ask(bob, settings=cim_pb2.PrivacySettings(messages="contacts"))
        alice = self.node.connect("alice")
        self.send(alice, "bob", 1)
        self.assertEqual(self.errors(alice)[1][0], FORBIDDEN)
        self.ask(alice, request=cim_pb2.ContactRef(user="bob"))
        accepted = self.ask(bob, accept=cim_pb2.ContactRef(user="alice"))
        self.assertEqual(accepted.status, "accepted")
        self.send(alice, "bob", 2)
        self.assertEqual(self.outcomes(alice)[2], (cim_pb2.DELIVERED, ""))

    def test_a_blocked_users_messages_requests_and_invitations_are_refused_alike(self) -> None:
        bob = self.node.connect("bob")
        stranger = self.node.connect("stranger")
        self.assertTrue(self.ask(bob, block=cim_pb2.ContactRef(user="stranger")).ok)
        self.assertEqual(stranger.events.of_type(cim_pb2.OFFLINE_NOTICE), [])  # not told
        # Messages.
        self.send(stranger, "bob", 1)
        self.send(stranger, "ghost", 2)
        errors = self.errors(stranger)
        self.assertEqual(errors[1], (FORBIDDEN, REASON_NOT_ACCEPTED, cim_pb2.MSG_R))
        self.assertEqual(errors[1], errors[2])
        # Contact requests.
        to_bob = self.ask(stranger, request=cim_pb2.ContactRef(user="bob"))
        to_ghost = self.ask(stranger, request=cim_pb2.ContactRef(user="ghost"))
        self.assertEqual((to_bob.ok, to_bob.error), (False, "not_accepted"))
        self.assertEqual(
            (to_bob.error, to_bob.message.replace("bob", "X")),
            (to_ghost.error, to_ghost.message.replace("ghost", "X")),
        )
        # Group invitations.
        created = self.group(stranger, create=cim_pb2.CreateGroup(name="club"))
        group = created.group.id
        for name in ("bob", "ghost"):
            for op in ("add", "invite"):
                reply = self.group(
                    stranger, **{op: cim_pb2.ChangeMembers(group=group, users=[name])}
                )
                self.assertEqual((reply.ok, reply.error), (False, "not_accepted"), (name, op))
        invited = self.group(stranger, invite=cim_pb2.ChangeMembers(group=group, users=["bob"]))
        ghost = self.group(stranger, invite=cim_pb2.ChangeMembers(group=group, users=["ghost"]))
        self.assertEqual(invited.message.replace("bob", "X"), ghost.message.replace("ghost", "X"))
        self.assertEqual(self.successResultOf(self.groups.invitations("bob")), [])
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        self.assertEqual(self.notices_for("bob"), [])

    def test_a_block_takes_effect_on_the_next_message(self) -> None:
        alice = self.node.connect("alice")
        bob = self.node.connect("bob", auto_ack=True)
        self.send(alice, "bob", 1)
        self.assertEqual(self.outcomes(alice)[1][0], cim_pb2.DELIVERED)
        self.ask(bob, block=cim_pb2.ContactRef(user="alice"))
        self.send(alice, "bob", 2)
        self.assertEqual(self.errors(alice)[2][0], FORBIDDEN)
        self.ask(bob, unblock=cim_pb2.ContactRef(user="alice"))
        self.send(alice, "bob", 3)
        self.assertEqual(self.outcomes(alice)[3][0], cim_pb2.DELIVERED)

    def test_contact_requests_refusals_and_bad_frames_are_answered(self) -> None:
        alice = self.node.connect("alice")
        for op, error in (
            ({}, "bad_request"),
            ({"accept": cim_pb2.ContactRef(user="bob")}, "not_found"),
            ({"remove": cim_pb2.ContactRef(user="not a name")}, "bad_request"),
            ({"request": cim_pb2.ContactRef(user="alice")}, "bad_request"),
            ({"settings": cim_pb2.PrivacySettings(messages="friends")}, "bad_request"),
        ):
            reply = self.ask(alice, **op)
            self.assertEqual((reply.ok, reply.error), (False, error), op)
            self.assertTrue(reply.message)
        reply = self.ask(alice, device=WATCH, settings=cim_pb2.PrivacySettings(messages="contacts"))
        self.assertEqual(reply.error, "bad_request")
        reply = self.ask(alice, device=WATCH, list=cim_pb2.ListContacts())
        self.assertEqual(reply.error, "forbidden")
        self.assertFalse(alice.server_transport.disconnecting)


class PresenceTests(ContactNodeMixin, TestCase):
    """Acceptance 3: ONLINE_R names the caller's contacts and bound accounts only."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_online_shows_only_contacts_and_family(self) -> None:
        clients = {
            name: self.node.connect(name, auto_ack=True)
            for name in ("alice", "bob", "carol", "mum", "stranger", WATCH)
        }
        self.ask(clients["alice"], request=cim_pb2.ContactRef(user="bob"))
        self.ask(clients["bob"], accept=cim_pb2.ContactRef(user="alice"))
        self.ask(clients["mum"], request=cim_pb2.ContactRef(user="alice"))
        self.ask(clients["alice"], accept=cim_pb2.ContactRef(user="mum"))
        self.assertEqual(self.online(clients["alice"]), (2, ["bob", "mum"]))
        self.assertEqual(self.online(clients["mum"]), (2, ["alice", WATCH]))
        self.assertEqual(self.online(clients[WATCH]), (1, ["mum"]))
        self.assertEqual(self.online(clients["stranger"]), (0, []))
        self.assertEqual(self.online(clients["carol"]), (0, []))
        # Who goes offline leaves the list; a block ends the contact and the view.
        clients["bob"].server.transport.loseConnection()
        settle(self.node)
        self.assertEqual(self.online(clients["alice"]), (1, ["mum"]))
        self.ask(clients["mum"], block=cim_pb2.ContactRef(user="alice"))
        self.assertEqual(self.online(clients["alice"]), (0, []))
        self.assertEqual(self.online(clients["mum"]), (1, [WATCH]))

    def test_pages(self) -> None:
        alice = self.node.connect("alice")
        for name in ("bob", "carol", "mum", "dad"):
            client = self.node.connect(name)
            self.ask(alice, request=cim_pb2.ContactRef(user=name))
            self.ask(client, accept=cim_pb2.ContactRef(user="alice"))
        alice.protocol.send(cim_pb2.ONLINE_R, cim_pb2.OnlineR(offset=1, limit=2))
        settle(self.node)
        [page] = alice.events.of_type(cim_pb2.ONLINE_A)
        self.assertEqual((page.total, list(page.users)), (4, ["carol", "dad"]))
