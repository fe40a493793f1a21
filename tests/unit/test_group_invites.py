"""Consent to join a group (issue #17, item 2): invitations, and who adds whom at once.

Through the real ``GroupDirectory`` on a SQLite file run inline (PostgreSQL: see
tests/integration/test_contacts_postgresql.py), and through GROUP_R on a node.

- A guardian adds its watch to a family group (at once); nobody else can add it.
- A person invited to a group is a member only after accepting; a contact whose
  ``group_adds`` is ``contacts`` (the default) is added at once.
- Invitations follow the invitee's message policy and blocks, like messages.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cim.groups.directory import (
    AmbiguousGroupName,
    GroupDirectory,
    GroupDissolved,
    GroupError,
    GroupForbidden,
    GroupFull,
    GroupInfo,
    GroupNotAccepted,
    GroupNotFound,
)
from cim.logic.contacts import ContactBook
from cim.protocols import cim_pb2
from cim.storage.contacts import CONTACTS, NOBODY, PrivacyDefaults
from cim.storage.database import Database
from tests.fakes.contacts import befriend_txn
from tests.unit.test_contacts import PEOPLE, START, WATCH, RecordingNotices, bind_txn, people_txn
from tests.unit.test_contacts_node import ContactNodeMixin
from tests.unit.test_delivery import settle
from tests.unit.test_groups import CountingRunner
from tests.unit.test_storage import sqlite_url

T = TypeVar("T")


class InvitationMixin:
    """alice, bob, carol, mum, dad, stranger and watch (mum guards it, dad is pending);
    alice and carol are contacts, and the watch's contact alice was approved by mum."""

    def database_url(self) -> str:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.db = Database(self.database_url(), None, runner=CountingRunner())
        self.ok(self.db.start())
        case: Any = self
        case.addCleanup(self.db.stop)
        self.ok(self.db.run(people_txn, PEOPLE))
        self.ok(self.db.run(people_txn, [WATCH], "device"))
        self.ok(self.db.run(bind_txn, WATCH, "mum"))
        self.ok(self.db.run(bind_txn, WATCH, "dad", "pending"))
        self.ok(self.db.run(befriend_txn, "alice", "carol"))
        self.ok(self.db.run(befriend_txn, "alice", WATCH))
        self.notices = RecordingNotices()
        self.groups = self.directory()
        self.book = ContactBook(self.db, self.clock, PrivacyDefaults())

    def directory(self, **kwargs: Any) -> GroupDirectory:
        directory = GroupDirectory(self.db, self.clock, **kwargs)
        directory.notices = self.notices
        return directory

    def ok(self, d: Deferred[T]) -> T:
        case: Any = self
        result: T = case.successResultOf(d)
        return result

    def refused(self, d: Deferred[Any], kind: type[GroupError], code: str) -> GroupError:
        case: Any = self
        error: GroupError = case.failureResultOf(d, kind).value
        case.assertEqual(error.code, code)
        return error

    def names(self, group_id: str) -> list[str]:
        return self.ok(self.groups.member_names(group_id))

    def act(self, work: Any) -> Any:
        return self.ok(Deferred.fromCoroutine(work))


class DeviceTests(InvitationMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def test_a_guardian_adds_the_watch_to_a_family_group(self) -> None:
        family = self.ok(self.groups.create("mum", "family", [WATCH]))
        self.assertEqual((family.invited, family.member_count), ((), 2))
        self.assertEqual(self.names(family.id), ["mum", WATCH])
        other = self.ok(self.groups.create("mum", "school run"))
        added = self.ok(self.groups.invite("mum", other.id, [WATCH]))  # a device: at once
        self.assertEqual((added.invited, self.names(other.id)), ((), ["mum", WATCH]))
        self.assertEqual(self.notices.sent, [])
        self.assertEqual(self.ok(self.groups.invitations(WATCH)), [])

    def test_nobody_else_can_add_the_watch(self) -> None:
        for actor in ("stranger", "dad", "alice"):  # a stranger, a pending guardian, a contact
            group = self.ok(self.groups.create(actor, "club"))
            for bring_in in (self.groups.add, self.groups.invite):
                error = self.refused(
                    bring_in(actor, group.id, [WATCH]), GroupNotAccepted, "not_accepted"
                )
                self.assertIn(repr(WATCH), error.message)
            self.refused(self.groups.create(actor, "c2", [WATCH]), GroupNotAccepted, "not_accepted")
            self.assertEqual(self.names(group.id), [actor])
        self.assertEqual(self.ok(self.groups.list_for(WATCH)), [])

    def test_a_device_chooses_no_groups(self) -> None:
        self.refused(self.groups.create(WATCH, "mine"), GroupForbidden, "forbidden")
        family = self.ok(self.groups.create("mum", "family", [WATCH]))
        self.ok(self.groups.promote("mum", family.id, [WATCH]))
        self.refused(self.groups.add(WATCH, family.id, ["alice"]), GroupForbidden, "forbidden")
        self.ok(self.groups.leave(WATCH, family.id))  # leaving is always allowed


class InvitationTests(InvitationMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def test_an_invited_person_is_a_member_only_after_accepting(self) -> None:
        club = self.ok(self.groups.create("alice", "club", ["bob", "carol"]))
        # carol is alice's contact and lets contacts add her: she is in. bob is invited.
        self.assertEqual((club.invited, club.member_count), (("bob",), 2))
        self.assertEqual(self.names(club.id), ["alice", "carol"])
        self.assertFalse(self.ok(self.groups.is_member(club.id, "bob")))
        self.refused(self.groups.members("bob", club.id), GroupForbidden, "forbidden")
        self.assertEqual(
            self.notices.sent,
            [(["bob"], "group.invited", {"group": club.id, "name": "club", "invited_by": "alice"})],
        )
        [waiting] = self.ok(self.groups.invitations("bob"))
        self.assertEqual(
            (waiting.group.id, waiting.invited_by, waiting.invited_at), (club.id, "alice", START)
        )
        self.clock.advance(3)
        joined = self.ok(self.groups.accept("bob", club.id))
        self.assertEqual(joined.member_count, 3)
        self.assertEqual(self.names(club.id), ["alice", "bob", "carol"])
        self.assertEqual(self.ok(self.groups.invitations("bob")), [])
        self.refused(self.groups.accept("bob", club.id), GroupNotFound, "not_found")

    def test_decline(self) -> None:
        club = self.ok(self.groups.create("alice", "club", ["bob"]))
        sent = len(self.notices.sent)
        self.ok(self.groups.decline("bob", club.id))
        self.assertEqual(len(self.notices.sent), sent)  # the inviter is not told
        self.assertEqual(self.names(club.id), ["alice"])
        self.refused(self.groups.decline("bob", club.id), GroupNotFound, "not_found")
        self.refused(self.groups.accept("bob", club.id), GroupNotFound, "not_found")

    def test_group_adds_nobody_makes_even_contacts_invite(self) -> None:
        self.act(self.book.change_settings("carol", group_adds=NOBODY))
        club = self.ok(self.groups.create("alice", "club", ["carol"]))
        self.assertEqual((club.invited, self.names(club.id)), (("carol",), ["alice"]))
        self.act(self.book.change_settings("carol", group_adds=CONTACTS))
        other = self.ok(self.groups.create("alice", "other"))
        invited = self.ok(self.groups.invite("alice", other.id, ["carol"]))  # invite: always
        self.assertEqual(invited.invited, ("carol",))
        added = self.ok(
            self.groups.add("alice", self.ok(self.groups.create("alice", "x")).id, ["carol"])
        )
        self.assertEqual(added.invited, ())

    def test_the_server_default_decides_for_who_never_chose(self) -> None:
        groups = self.directory(defaults=PrivacyDefaults(group_adds=NOBODY))
        club = self.ok(groups.create("alice", "club", ["carol"]))
        self.assertEqual(club.invited, ("carol",))
        strict = self.directory(defaults=PrivacyDefaults(messages=CONTACTS))
        self.refused(strict.create("alice", "c", ["bob"]), GroupNotAccepted, "not_accepted")
        self.assertEqual(self.ok(strict.create("alice", "c", ["carol"])).invited, ())

    def test_invitations_follow_the_message_policy_and_blocks(self) -> None:
        self.act(self.book.change_settings("bob", messages=CONTACTS))
        self.act(self.book.block("carol", "stranger"))
        club = self.ok(self.groups.create("stranger", "club"))
        for invitee in ("bob", "carol", "ghost"):
            error = self.refused(
                self.groups.invite("stranger", club.id, [invitee]), GroupNotAccepted, "not_accepted"
            )
            self.assertEqual(
                error.message.replace(repr(invitee), "X"),
                "not accepted: X: no such user, or they do not accept this from you",
            )
        # One refused name refuses the whole request: dad is not invited either.
        self.refused(
            self.groups.invite("stranger", club.id, ["dad", "bob"]),
            GroupNotAccepted,
            "not_accepted",
        )
        self.assertEqual(self.ok(self.groups.invitations("dad")), [])
        self.assertEqual(self.notices.sent, [])

    def test_a_block_withdraws_the_blocked_ones_invitations(self) -> None:
        club = self.ok(self.groups.create("stranger", "club", ["bob"]))
        self.assertEqual(club.invited, ("bob",))
        self.act(self.book.block("bob", "stranger"))
        self.assertEqual(self.ok(self.groups.invitations("bob")), [])

    def test_remove_withdraws_an_invitation_and_dissolve_ends_them(self) -> None:
        club = self.ok(self.groups.create("alice", "club", ["bob", "stranger"]))
        self.ok(self.groups.remove("alice", club.id, ["bob"]))
        self.assertEqual(self.ok(self.groups.invitations("bob")), [])
        self.refused(self.groups.remove("alice", club.id, ["bob"]), GroupNotFound, "not_found")
        self.ok(self.groups.dissolve("alice", club.id))
        self.assertEqual(self.ok(self.groups.invitations("stranger")), [])
        self.refused(self.groups.accept("stranger", club.id), GroupDissolved, "conflict")

    def test_accepting_into_a_full_group(self) -> None:
        groups = self.directory(max_members=2)
        club = self.ok(groups.create("alice", "club", ["bob"]))
        self.ok(groups.invite("alice", club.id, ["stranger"]))  # invitations do not count
        self.ok(groups.accept("bob", club.id))
        self.refused(groups.accept("stranger", club.id), GroupFull, "conflict")
        self.assertEqual(len(self.ok(groups.invitations("stranger"))), 1)  # still waiting

    def test_only_owners_and_admins_invite(self) -> None:
        club = self.ok(self.groups.create("alice", "club", ["carol"]))
        self.refused(self.groups.invite("carol", club.id, ["bob"]), GroupForbidden, "forbidden")
        self.refused(self.groups.invite("bob", club.id, ["dad"]), GroupForbidden, "forbidden")

    def test_resolving_an_invitation_by_name(self) -> None:
        first = self.ok(self.groups.create("alice", "club", ["bob"]))
        self.assertEqual(self.ok(self.groups.resolve_invitation("bob", "club")), first.id)
        self.assertEqual(self.ok(self.groups.resolve_invitation("bob", first.id)), first.id)
        self.refused(self.groups.resolve_invitation("carol", "club"), GroupNotFound, "not_found")
        self.clock.advance(1)
        second = self.ok(self.groups.create("stranger", "club", ["bob"]))
        error = self.refused(
            self.groups.resolve_invitation("bob", "club"), AmbiguousGroupName, "bad_request"
        )
        assert isinstance(error, AmbiguousGroupName)
        self.assertEqual(error.group_ids, (first.id, second.id))

    def test_members_already_in_are_left_alone(self) -> None:
        club: GroupInfo = self.ok(self.groups.create("alice", "club", ["carol"]))
        again = self.ok(self.groups.invite("alice", club.id, ["carol"]))
        self.assertEqual((again.invited, again.member_count), ((), 2))


class GroupRequestTests(ContactNodeMixin, TestCase):
    """The same over GROUP_R, and posts reach an invitee only once it accepted."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_invite_accept_decline_and_invitations_over_group_r(self) -> None:
        alice = self.node.connect("alice")
        bob = self.node.connect("bob", auto_ack=True)
        created = self.group(alice, create=cim_pb2.CreateGroup(name="club", members=["bob"]))
        self.assertEqual((created.ok, list(created.invited)), (True, ["bob"]))
        group = created.group.id
        alice.protocol.send(
            cim_pb2.MSG_R, cim_pb2.Message(group=group, text="before", client_seq=1)
        )
        settle(self.node)
        listed = self.group(bob, invitations=cim_pb2.ListInvitations())
        self.assertEqual(
            [(i.group.id, i.group.name, i.invited_by) for i in listed.invitations],
            [(group, "club", "alice")],
        )
        self.assertEqual([n["event"] for n in self.notices_for("bob")], ["group.invited"])
        accepted = self.group(bob, accept=cim_pb2.GroupRef(group="club"))
        self.assertEqual((accepted.ok, accepted.group.member_count), (True, 2))
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(group=group, text="after", client_seq=2))
        settle(self.node)
        self.assertEqual([m.text for m in bob.events.of_type(cim_pb2.MSG_N)], ["after"])
        # A second invitation, declined by name.
        other = self.group(alice, create=cim_pb2.CreateGroup(name="other", members=["bob"]))
        declined = self.group(bob, decline=cim_pb2.GroupRef(group="other"))
        self.assertTrue(declined.ok)
        self.assertEqual(self.successResultOf(self.groups.member_names(other.group.id)), ["alice"])
        again = self.group(bob, accept=cim_pb2.GroupRef(group="other"))
        self.assertEqual((again.ok, again.error), (False, "not_found"))

    def test_a_guardian_adds_the_watch_and_a_stranger_cannot_over_group_r(self) -> None:
        mum = self.node.connect("mum")
        stranger = self.node.connect("stranger")
        family = self.group(mum, create=cim_pb2.CreateGroup(name="family", members=[WATCH]))
        self.assertEqual(
            (family.ok, family.group.member_count, list(family.invited)), (True, 2, [])
        )
        club = self.group(stranger, create=cim_pb2.CreateGroup(name="club"))
        refused = self.group(
            stranger, add=cim_pb2.ChangeMembers(group=club.group.id, users=[WATCH])
        )
        self.assertEqual((refused.ok, refused.error), (False, "not_accepted"))
        self.assertEqual(
            self.successResultOf(self.groups.member_names(club.group.id)), ["stranger"]
        )
