"""cim.groups: group management, its permission rules, the member cache and GROUP_R.

The database runs synchronously through an injected runner (no reactor, no threads),
and time is a ``task.Clock``. ``GroupTests`` runs on a temporary SQLite file;
tests/integration/test_groups.py runs the same tests on a scratch PostgreSQL database.
``NodeRuleTests`` drive an IM node (``tests.fakes.node.NodeHarness``) whose membership,
account and group-history checks go through the real directory, accounts and history
on SQLite; tests/integration/test_groups.py runs them again on PostgreSQL, and with the
database on its thread pool and the real reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cim.accounts.store import AccountStore
from cim.config import parse_config
from cim.groups.directory import (
    DEFAULT_MAX_MEMBERS,
    AmbiguousGroupName,
    BadGroupRequest,
    GroupDirectory,
    GroupDissolved,
    GroupError,
    GroupForbidden,
    GroupFull,
    GroupInfo,
    GroupNotAccepted,
    GroupNotFound,
    LeaveRecord,
    answer,
    check_group_name,
    is_group_id,
    new_group_id,
)
from cim.history.service import HistoryService
from cim.protocols import cim_pb2
from cim.storage.accounts import delete_user_txn, insert_user_txn
from cim.storage.database import Database
from cim.storage.groups import leave_all_groups_txn
from tests.fakes.contacts import befriend_txn
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_delivery import settle
from tests.unit.test_storage import QueuedRunner, sqlite_url

T = TypeVar("T")

USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
START = 1_700_000_000.0


class CountingRunner:
    """Runs work at once and counts it: a database hit is one run."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, work: Callable[[], T]) -> Deferred[T]:
        self.runs += 1
        return maybeDeferred(work)


def add_users_txn(connection: Connection, names: tuple[str, ...]) -> None:
    """The users, all contacts of each other: these tests are about group management,
    so adding a member adds it (consent to join is tests/unit/test_group_invites.py's)."""
    for name in names:
        insert_user_txn(connection, name, "scrypt$not-a-real-hash", "person", 1.0)
    befriend_txn(connection, *names)


class GroupTestsMixin:
    """Shared set-up; the engine is chosen by ``database_url``."""

    def database_url(self) -> str:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.url = self.database_url()
        self.runner = CountingRunner()
        self.db = self.start_database(self.runner)
        self.groups = GroupDirectory(self.db, self.clock)

    def start_database(self, runner: Any) -> Database:
        case: Any = self
        db = Database(self.url, None, runner=runner)
        started = db.start()
        added = started.addCallback(lambda _: db.run(add_users_txn, USERS))
        if isinstance(runner, QueuedRunner):
            runner.run_all()
        case.successResultOf(added)
        case.addCleanup(db.stop)
        return db

    def directory(self, **kwargs: Any) -> GroupDirectory:
        return GroupDirectory(self.db, self.clock, **kwargs)

    def ok(self, d: Deferred[T]) -> T:
        case: Any = self
        result: T = case.successResultOf(d)
        return result

    def refused(self, d: Deferred[Any], kind: type[GroupError], code: str) -> GroupError:
        case: Any = self
        error = case.failureResultOf(d, kind).value
        case.assertEqual(error.code, code)
        assert isinstance(error, kind)
        return error

    def team(self, directory: GroupDirectory | None = None) -> GroupInfo:
        """alice owns "team" with bob, carol and dave; bob is an admin."""
        directory = directory or self.groups
        info = self.ok(directory.create("alice", "team", ["bob", "carol", "dave"]))
        self.ok(directory.promote("alice", info.id, ["bob"]))
        return info

    def names(self, group_id: str) -> list[str]:
        return self.ok(self.groups.member_names(group_id))

    def roles(self, actor: str, group_id: str) -> list[tuple[str, str]]:
        return [(m.user, m.role) for m in self.ok(self.groups.members(actor, group_id))]


class GroupTests(GroupTestsMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    # --- create ---------------------------------------------------------------------

    def test_create(self) -> None:
        info = self.ok(self.groups.create("alice", "team", ["bob", "alice", "carol", "bob"]))
        self.assertTrue(is_group_id(info.id))
        self.assertEqual(
            (info.name, info.owner, info.admins, info.member_count, info.created_at),
            ("team", "alice", (), 3, START),
        )
        self.assertEqual(
            self.roles("bob", info.id), [("alice", "owner"), ("bob", "member"), ("carol", "member")]
        )

    def test_create_alone(self) -> None:
        info = self.ok(self.groups.create("alice", "notes"))
        self.assertEqual(info.member_count, 1)

    def test_group_ids_are_random_and_opaque(self) -> None:
        ids = {new_group_id() for _ in range(100)}
        self.assertEqual(len(ids), 100)
        self.assertTrue(all(len(i) == 26 and is_group_id(i) for i in ids))
        self.assertFalse(is_group_id("team"))

    def test_create_refuses_bad_names(self) -> None:
        for name in ["", "x" * 65, " team", "team ", "te\nam", "te\x00am", "a\u2028b"]:
            self.refused(self.groups.create("alice", name), BadGroupRequest, "bad_request")
        self.assertEqual(self.ok(self.groups.list_for("alice")), [])
        check_group_name("x" * 64)
        check_group_name("家族 👨‍👩‍👧")

    def test_create_refuses_unknown_users(self) -> None:
        # The answer for a name without an account is the one for a refusal of consent
        # (docs/privacy.md): nothing says which of the two it was.
        error = self.refused(
            self.groups.create("alice", "team", ["bob", "zed", "yolanda"]),
            GroupNotAccepted,
            "not_accepted",
        )
        self.assertIn("'zed', 'yolanda'", error.message)
        self.assertEqual(self.ok(self.groups.list_for("alice")), [])
        self.assertEqual(self.ok(self.groups.list_for("bob")), [])

    def test_create_refuses_invalid_user_names(self) -> None:
        self.refused(self.groups.create("alice", "t", ["bad name"]), BadGroupRequest, "bad_request")

    def test_create_refuses_too_many_members(self) -> None:
        groups = self.directory(max_members=3)
        self.refused(
            groups.create("alice", "t", ["bob", "carol", "dave"]), BadGroupRequest, "bad_request"
        )
        self.assertEqual(self.ok(groups.create("alice", "t", ["bob", "carol"])).member_count, 3)
        self.assertEqual(self.groups.max_members, DEFAULT_MAX_MEMBERS)

    # --- rename ---------------------------------------------------------------------

    def test_rename_by_owner_and_admin(self) -> None:
        info = self.team()
        self.clock.advance(5)
        self.assertEqual(self.ok(self.groups.rename("alice", info.id, "crew")).name, "crew")
        renamed = self.ok(self.groups.rename("bob", info.id, "band"))
        self.assertEqual((renamed.name, renamed.created_at), ("band", START))
        self.assertEqual([g.name for g in self.ok(self.groups.list_for("dave"))], ["band"])

    def test_rename_refusals(self) -> None:
        info = self.team()
        self.refused(self.groups.rename("carol", info.id, "x"), GroupForbidden, "forbidden")
        self.refused(self.groups.rename("erin", info.id, "x"), GroupForbidden, "forbidden")
        self.refused(self.groups.rename("alice", info.id, ""), BadGroupRequest, "bad_request")
        self.refused(self.groups.rename("alice", new_group_id(), "x"), GroupNotFound, "not_found")
        self.refused(self.groups.rename("alice", "team", "x"), GroupNotFound, "not_found")
        self.assertEqual(self.ok(self.groups.list_for("alice"))[0].name, "team")

    # --- add ------------------------------------------------------------------------

    def test_add_by_admin(self) -> None:
        info = self.team()
        self.clock.advance(1)
        added = self.ok(self.groups.add("bob", info.id, ["erin", "carol"]))
        self.assertEqual(added.member_count, 5)
        self.assertEqual(self.roles("erin", info.id)[-1], ("erin", "member"))
        again = self.ok(self.groups.add("alice", info.id, ["erin", "bob"]))
        self.assertEqual((again.member_count, again.admins), (5, ("bob",)))

    def test_add_refusals(self) -> None:
        info = self.team()
        self.refused(self.groups.add("carol", info.id, ["erin"]), GroupForbidden, "forbidden")
        self.refused(self.groups.add("erin", info.id, ["erin"]), GroupForbidden, "forbidden")
        error = self.refused(
            self.groups.add("alice", info.id, ["erin", "zed"]), GroupNotAccepted, "not_accepted"
        )
        self.assertIn("zed", error.message)
        self.assertNotIn("erin", error.message)
        self.refused(self.groups.add("alice", info.id, []), BadGroupRequest, "bad_request")
        self.refused(self.groups.add("alice", info.id, ["-x"]), BadGroupRequest, "bad_request")
        self.refused(self.groups.add("alice", new_group_id(), ["erin"]), GroupNotFound, "not_found")
        self.assertEqual(self.names(info.id), ["alice", "bob", "carol", "dave"])

    def test_add_beyond_the_limit(self) -> None:
        groups = self.directory(max_members=5)
        info = self.ok(groups.create("alice", "t", ["bob", "carol"]))
        self.refused(groups.add("alice", info.id, ["dave", "erin", "frank"]), GroupFull, "conflict")
        self.assertEqual(self.ok(groups.add("alice", info.id, ["dave", "erin"])).member_count, 5)
        self.refused(groups.add("alice", info.id, ["frank"]), GroupFull, "conflict")
        # Re-adding members does not count against the limit.
        self.assertEqual(self.ok(groups.add("alice", info.id, ["bob"])).member_count, 5)
        self.refused(
            groups.add("alice", info.id, [*USERS, "x1", "x2"]), BadGroupRequest, "bad_request"
        )

    def test_nobody_adds_to_a_dissolved_group(self) -> None:
        info = self.team()
        self.ok(self.groups.dissolve("alice", info.id))
        for actor in ("alice", "bob", "erin"):
            self.refused(self.groups.add(actor, info.id, ["erin"]), GroupDissolved, "conflict")
        self.assertEqual(self.names(info.id), [])

    # --- remove ---------------------------------------------------------------------

    def test_remove(self) -> None:
        info = self.team()
        self.assertEqual(self.ok(self.groups.remove("bob", info.id, ["carol"])).member_count, 3)
        removed = self.ok(self.groups.remove("alice", info.id, ["bob", "dave"]))
        self.assertEqual((removed.member_count, removed.admins), (1, ()))
        self.assertEqual(self.names(info.id), ["alice"])

    def test_admins_cannot_remove_the_owner_or_admins(self) -> None:
        info = self.team()
        self.ok(self.groups.add("alice", info.id, ["erin"]))
        self.ok(self.groups.promote("alice", info.id, ["erin"]))
        for target in (["alice"], ["erin"], ["carol", "erin"]):
            self.refused(self.groups.remove("bob", info.id, target), GroupForbidden, "forbidden")
        self.assertEqual(len(self.names(info.id)), 5)
        self.ok(self.groups.remove("alice", info.id, ["erin"]))

    def test_remove_refusals(self) -> None:
        info = self.team()
        self.refused(self.groups.remove("carol", info.id, ["dave"]), GroupForbidden, "forbidden")
        self.refused(self.groups.remove("erin", info.id, ["dave"]), GroupForbidden, "forbidden")
        error = self.refused(
            self.groups.remove("alice", info.id, ["erin", "zed"]), GroupNotFound, "not_found"
        )
        self.assertIn("'erin', 'zed'", error.message)
        self.refused(self.groups.remove("bob", info.id, ["bob"]), BadGroupRequest, "bad_request")
        self.refused(
            self.groups.remove("alice", info.id, ["alice"]), BadGroupRequest, "bad_request"
        )
        self.assertEqual(len(self.names(info.id)), 4)

    # --- promote --------------------------------------------------------------------

    def test_promote(self) -> None:
        info = self.team()
        self.clock.advance(1)
        promoted = self.ok(self.groups.promote("alice", info.id, ["dave", "carol", "bob"]))
        # Longest-standing first; carol and dave joined together, so by name.
        self.assertEqual(promoted.admins, ("bob", "carol", "dave"))

    def test_promote_refusals(self) -> None:
        info = self.team()
        self.refused(self.groups.promote("bob", info.id, ["carol"]), GroupForbidden, "forbidden")
        self.refused(self.groups.promote("carol", info.id, ["carol"]), GroupForbidden, "forbidden")
        self.refused(self.groups.promote("alice", info.id, ["erin"]), GroupNotFound, "not_found")
        self.refused(
            self.groups.promote("alice", info.id, ["alice"]), BadGroupRequest, "bad_request"
        )
        self.assertEqual(self.ok(self.groups.list_for("alice"))[0].admins, ("bob",))

    # --- leave ----------------------------------------------------------------------

    def test_member_leaves(self) -> None:
        info = self.team()
        self.assertEqual(
            self.ok(self.groups.leave("carol", info.id)), LeaveRecord(info.id, None, False)
        )
        self.assertEqual(self.names(info.id), ["alice", "bob", "dave"])
        self.assertEqual(self.ok(self.groups.list_for("carol")), [])
        self.refused(self.groups.leave("carol", info.id), GroupForbidden, "forbidden")

    def test_owner_leaving_passes_to_the_longest_standing_admin(self) -> None:
        info = self.ok(self.groups.create("alice", "t", ["carol"]))
        self.clock.advance(1)
        self.ok(self.groups.add("alice", info.id, ["dave"]))
        self.clock.advance(1)
        self.ok(self.groups.add("alice", info.id, ["bob"]))
        # bob was made admin first, but dave has been in the group longer.
        self.ok(self.groups.promote("alice", info.id, ["bob"]))
        self.ok(self.groups.promote("alice", info.id, ["dave"]))
        self.assertEqual(
            self.ok(self.groups.leave("alice", info.id)), LeaveRecord(info.id, "dave", False)
        )
        self.assertEqual(
            self.roles("bob", info.id), [("dave", "owner"), ("bob", "admin"), ("carol", "member")]
        )
        self.assertEqual(self.ok(self.groups.list_for("bob"))[0].owner, "dave")
        # The new owner has the owner's powers.
        self.ok(self.groups.remove("dave", info.id, ["bob"]))

    def test_owner_leaving_without_admins_passes_to_the_longest_standing_member(self) -> None:
        info = self.ok(self.groups.create("alice", "t", ["dave"]))
        self.clock.advance(1)
        self.ok(self.groups.add("alice", info.id, ["bob"]))
        self.assertEqual(self.ok(self.groups.leave("alice", info.id)).new_owner, "dave")
        self.assertEqual(self.roles("bob", info.id), [("dave", "owner"), ("bob", "member")])

    def test_last_member_leaving_dissolves(self) -> None:
        info = self.ok(self.groups.create("alice", "t", ["bob"]))
        self.ok(self.groups.leave("bob", info.id))
        self.assertEqual(
            self.ok(self.groups.leave("alice", info.id)), LeaveRecord(info.id, None, True)
        )
        self.refused(self.groups.leave("alice", info.id), GroupDissolved, "conflict")
        self.refused(self.groups.members("alice", info.id), GroupDissolved, "conflict")
        self.assertEqual(self.ok(self.groups.list_for("alice")), [])

    def test_leave_unknown_group(self) -> None:
        self.refused(self.groups.leave("alice", new_group_id()), GroupNotFound, "not_found")

    # --- dissolve -------------------------------------------------------------------

    def test_dissolve(self) -> None:
        info = self.team()
        self.refused(self.groups.dissolve("bob", info.id), GroupForbidden, "forbidden")
        self.refused(self.groups.dissolve("erin", info.id), GroupForbidden, "forbidden")
        self.assertEqual(
            self.ok(self.groups.dissolve("alice", info.id)), ["alice", "bob", "carol", "dave"]
        )
        for user in ("alice", "bob"):
            self.assertEqual(self.ok(self.groups.list_for(user)), [])
        self.refused(self.groups.rename("alice", info.id, "x"), GroupDissolved, "conflict")
        self.refused(self.groups.dissolve("alice", info.id), GroupDissolved, "conflict")
        self.assertFalse(self.ok(self.groups.is_member(info.id, "alice")))

    # --- reads ----------------------------------------------------------------------

    def test_members_for_members_only(self) -> None:
        info = self.team()
        expected = [("alice", "owner"), ("bob", "admin"), ("carol", "member"), ("dave", "member")]
        self.assertEqual(self.roles("dave", info.id), expected)
        self.refused(self.groups.members("erin", info.id), GroupForbidden, "forbidden")
        self.refused(self.groups.members("alice", new_group_id()), GroupNotFound, "not_found")

    def test_list_for(self) -> None:
        team = self.team()
        self.clock.advance(1)
        solo = self.ok(self.groups.create("carol", "apes"))
        listed = self.ok(self.groups.list_for("carol"))
        self.assertEqual([g.id for g in listed], [solo.id, team.id])
        self.assertEqual(listed[1], GroupInfo(team.id, "team", "alice", ("bob",), 4, START))
        self.assertEqual(self.ok(self.groups.list_for("frank")), [])

    # --- resolve --------------------------------------------------------------------

    def test_resolve(self) -> None:
        info = self.team()
        self.assertEqual(self.ok(self.groups.resolve("carol", info.id)), info.id)
        self.assertEqual(self.ok(self.groups.resolve("carol", "team")), info.id)
        # An id works for anyone; what they may do with it is up to the operation.
        self.assertEqual(self.ok(self.groups.resolve("erin", info.id)), info.id)
        self.refused(self.groups.resolve("erin", "team"), GroupNotFound, "not_found")
        self.refused(self.groups.resolve("carol", "Team"), GroupNotFound, "not_found")
        self.refused(self.groups.resolve("carol", ""), BadGroupRequest, "bad_request")
        self.refused(self.groups.resolve("carol", "x" * 1000), GroupNotFound, "not_found")

    def test_resolve_ambiguous_name(self) -> None:
        first = self.team()
        self.clock.advance(1)
        second = self.ok(self.groups.create("carol", "team", ["dave"]))
        self.assertEqual(self.ok(self.groups.resolve("bob", "team")), first.id)
        error = self.refused(self.groups.resolve("dave", "team"), AmbiguousGroupName, "bad_request")
        self.assertIsInstance(error, AmbiguousGroupName)
        assert isinstance(error, AmbiguousGroupName)
        self.assertEqual(error.group_ids, (first.id, second.id))
        self.assertIn("2 of your groups are named 'team'", error.message)
        self.assertIn(first.id, error.message)
        self.assertIn(second.id, error.message)
        # Leaving one of them makes the name unambiguous again.
        self.ok(self.groups.leave("dave", first.id))
        self.assertEqual(self.ok(self.groups.resolve("dave", "team")), second.id)

    def test_resolve_ignores_dissolved_groups(self) -> None:
        info = self.team()
        self.ok(self.groups.dissolve("alice", info.id))
        self.refused(self.groups.resolve("alice", "team"), GroupNotFound, "not_found")

    # --- the member cache -----------------------------------------------------------

    def test_member_names_come_from_memory(self) -> None:
        info = self.team()
        before = self.runner.runs
        self.assertEqual(self.names(info.id), ["alice", "bob", "carol", "dave"])
        self.assertEqual(self.runner.runs, before + 1)
        for _ in range(10):
            self.assertEqual(self.names(info.id), ["alice", "bob", "carol", "dave"])
            self.assertTrue(self.ok(self.groups.is_member(info.id, "carol")))
            self.assertFalse(self.ok(self.groups.is_member(info.id, "erin")))
        self.assertEqual(self.runner.runs, before + 1)

    def test_member_names_returns_a_copy(self) -> None:
        info = self.team()
        self.names(info.id).append("mallory")
        self.assertFalse(self.ok(self.groups.is_member(info.id, "mallory")))

    def test_cache_follows_every_change(self) -> None:
        info = self.team()
        group = info.id
        steps: list[tuple[Callable[[], Deferred[Any]], list[str]]] = [
            (
                lambda: self.groups.add("bob", group, ["erin", "frank"]),
                ["alice", "bob", "carol", "dave", "erin", "frank"],
            ),
            (
                lambda: self.groups.remove("alice", group, ["frank"]),
                ["alice", "bob", "carol", "dave", "erin"],
            ),
            (
                lambda: self.groups.promote("alice", group, ["erin"]),
                ["alice", "bob", "carol", "dave", "erin"],
            ),
            (
                lambda: self.groups.rename("alice", group, "crew"),
                ["alice", "bob", "carol", "dave", "erin"],
            ),
            (lambda: self.groups.leave("carol", group), ["alice", "bob", "dave", "erin"]),
            (lambda: self.groups.leave("alice", group), ["bob", "dave", "erin"]),
            (lambda: self.groups.remove("bob", group, ["dave"]), ["bob", "erin"]),
            (lambda: self.groups.dissolve("bob", group), []),
        ]
        for change, expected in steps:
            self.names(group)  # cached before the change
            self.ok(change())
            self.assertEqual(self.names(group), expected)
            runs = self.runner.runs
            self.assertEqual(self.names(group), expected)
            self.assertEqual(self.runner.runs, runs)
        self.assertFalse(self.ok(self.groups.is_member(group, "bob")))

    def test_refused_change_keeps_cache_right(self) -> None:
        info = self.team()
        self.names(info.id)
        self.refused(self.groups.add("alice", info.id, ["zed"]), GroupNotAccepted, "not_accepted")
        self.assertEqual(self.names(info.id), ["alice", "bob", "carol", "dave"])

    def test_cache_expires(self) -> None:
        info = self.team()
        other = self.directory(cache_ttl=30.0)  # say, another node
        self.assertEqual(self.ok(other.member_names(info.id)), ["alice", "bob", "carol", "dave"])
        self.ok(self.groups.add("alice", info.id, ["erin"]))
        self.clock.advance(29)
        self.assertFalse(self.ok(other.is_member(info.id, "erin")))
        self.clock.advance(1)
        self.assertTrue(self.ok(other.is_member(info.id, "erin")))

    def test_a_list_in_use_is_read_again_before_it_expires(self) -> None:
        info = self.team()
        other = self.directory(cache_ttl=40.0)  # say, another node
        self.assertFalse(self.ok(other.is_member(info.id, "erin")))
        self.ok(self.groups.add("alice", info.id, ["erin"]))
        runs = self.runner.runs
        self.clock.advance(29)  # not yet in the last quarter of its life: memory only
        self.assertFalse(self.ok(other.is_member(info.id, "erin")))
        self.assertEqual(self.runner.runs, runs)
        self.clock.advance(1)
        # Answered from memory at once, and read again meanwhile (here the read answers
        # at once): the next question sees the change, and nobody waited for it.
        self.assertFalse(self.ok(other.is_member(info.id, "erin")))
        self.assertEqual(self.runner.runs, runs + 1)
        self.assertTrue(self.ok(other.is_member(info.id, "erin")))
        self.assertEqual(self.runner.runs, runs + 1)

    def test_forget(self) -> None:
        info = self.team()
        other = self.directory(cache_ttl=None)
        self.assertFalse(self.ok(other.is_member(info.id, "erin")))
        self.ok(self.groups.add("alice", info.id, ["erin"]))
        self.clock.advance(10_000)
        self.assertFalse(self.ok(other.is_member(info.id, "erin")))
        other.forget(info.id)
        self.assertTrue(self.ok(other.is_member(info.id, "erin")))

    def test_cache_is_bounded(self) -> None:
        groups = self.directory(cache_size=2)
        ids = [self.ok(groups.create("alice", f"g{i}")).id for i in range(3)]
        for group_id in ids:
            self.ok(groups.member_names(group_id))
        runs = self.runner.runs
        self.ok(groups.member_names(ids[2]))
        self.ok(groups.member_names(ids[1]))
        self.assertEqual(self.runner.runs, runs)
        self.ok(groups.member_names(ids[0]))
        self.assertEqual(self.runner.runs, runs + 1)

    def test_unknown_groups_have_no_members(self) -> None:
        runs = self.runner.runs
        self.assertEqual(self.names("not an id"), [])
        self.assertEqual(self.runner.runs, runs)
        self.assertEqual(self.names(new_group_id()), [])
        self.assertFalse(self.ok(self.groups.is_member(new_group_id(), "alice")))


class CacheRaceTests(GroupTestsMixin, TestCase):
    """Loads and changes held in a queue, to interleave them like a busy pool."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def setUp(self) -> None:
        self.clock = Clock()
        self.url = self.database_url()
        self.queue = QueuedRunner()
        self.db = self.start_database(self.queue)
        self.groups = self.directory()

    def run_queued(self, d: Deferred[T]) -> T:
        self.queue.run_all()
        return self.ok(d)

    def test_concurrent_questions_share_one_read(self) -> None:
        info = self.run_queued(self.groups.create("alice", "t", ["bob"]))
        asked: list[Deferred[Any]] = [
            self.groups.member_names(info.id),
            self.groups.is_member(info.id, "bob"),
        ]
        self.assertEqual(len(self.queue.queued), 1)
        self.queue.run_all()
        self.assertEqual([self.ok(d) for d in asked], [["alice", "bob"], True])

    def test_read_racing_a_change_is_not_kept(self) -> None:
        """A read that saw the old rows but reports after the change must not be kept.

        On a pool of several threads this happens when the read's thread is slower to
        hand its result back than the change's thread.
        """
        info = self.run_queued(self.groups.create("alice", "t", ["bob"]))
        stale = self.groups.member_names(info.id)
        [(read, read_done)] = self.queue.queued
        self.queue.queued.clear()
        before_change = read()  # the read's transaction runs first...
        removed = self.groups.remove("alice", info.id, ["bob"])
        self.queue.run_all()
        self.ok(removed)
        read_done.callback(before_change)  # ...and reports after the change
        self.assertEqual(self.ok(stale), ["alice", "bob"])
        fresh = self.groups.member_names(info.id)
        self.assertEqual(len(self.queue.queued), 1)
        self.assertEqual(self.run_queued(fresh), ["alice"])

    def test_question_during_a_change_reads_again(self) -> None:
        """A read that starts during a change may see the rows before it commits; what
        it saw must be dropped when the change reports."""
        info = self.run_queued(self.groups.create("alice", "t", ["bob"]))
        self.run_queued(self.groups.member_names(info.id))
        removed = self.groups.remove("alice", info.id, ["bob"])
        during = self.groups.is_member(info.id, "bob")
        self.assertEqual(len(self.queue.queued), 2)
        self.queue.queued.reverse()  # the read gets in before the change commits
        self.queue.run_all()
        self.ok(removed)
        self.assertTrue(self.ok(during))
        after = self.groups.is_member(info.id, "bob")
        self.assertEqual(len(self.queue.queued), 1)
        self.assertFalse(self.run_queued(after))

    def test_failed_read_reaches_every_waiter(self) -> None:
        info = self.run_queued(self.groups.create("alice", "t"))
        first = self.groups.member_names(info.id)
        second = self.groups.member_names(info.id)
        _work, d = self.queue.queued.pop()
        d.errback(RuntimeError("connection lost"))
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(second, RuntimeError)
        self.assertEqual(self.run_queued(self.groups.member_names(info.id)), ["alice"])


class AnswerTests(GroupTestsMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def ask(self, actor: str, **op: Any) -> cim_pb2.GroupAnswer:
        request = cim_pb2.GroupRequest(request_id=7, **op)
        reply = self.ok(Deferred.fromCoroutine(answer(self.groups, actor, request)))
        self.assertEqual(reply.request_id, 7)
        return reply

    def test_create(self) -> None:
        reply = self.ask("alice", create=cim_pb2.CreateGroup(name="team", members=["bob"]))
        self.assertTrue(reply.ok)
        self.assertEqual(
            (
                reply.group.name,
                reply.group.owner,
                reply.group.member_count,
                reply.group.created_at_ms,
            ),
            ("team", "alice", 2, int(START * 1000)),
        )
        self.assertTrue(is_group_id(reply.group.id))

    def test_every_operation_by_name(self) -> None:
        group = self.team().id
        change = cim_pb2.ChangeMembers

        reply = self.ask("bob", add=change(group="team", users=["erin", "frank"]))
        self.assertEqual((reply.ok, reply.group.id, reply.group.member_count), (True, group, 6))
        reply = self.ask("alice", remove=change(group="team", users=["frank"]))
        self.assertEqual(reply.group.member_count, 5)
        reply = self.ask("alice", promote=change(group=group, users=["erin"]))
        self.assertEqual(list(reply.group.admins), ["bob", "erin"])
        reply = self.ask("bob", rename=cim_pb2.RenameGroup(group="team", name="crew"))
        self.assertEqual(reply.group.name, "crew")

        reply = self.ask("carol", list=cim_pb2.ListGroups())
        self.assertEqual([(g.id, g.name) for g in reply.groups], [(group, "crew")])
        self.assertFalse(reply.HasField("group"))

        reply = self.ask("carol", members=cim_pb2.GroupRef(group="crew"))
        self.assertEqual(
            [(m.user, m.role) for m in reply.members],
            [
                ("alice", "owner"),
                ("bob", "admin"),
                ("erin", "admin"),
                ("carol", "member"),
                ("dave", "member"),
            ],
        )

        reply = self.ask("carol", leave=cim_pb2.GroupRef(group="crew"))
        self.assertTrue(reply.ok)
        self.assertFalse(self.ok(self.groups.is_member(group, "carol")))

        reply = self.ask("alice", dissolve=cim_pb2.GroupRef(group="crew"))
        self.assertTrue(reply.ok)
        self.assertEqual(self.names(group), [])
        self.assertEqual(len(self.ask("alice", list=cim_pb2.ListGroups()).groups), 0)

    def test_refusals(self) -> None:
        group = self.team().id
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("carol", {"add": cim_pb2.ChangeMembers(group=group, users=["erin"])}, "forbidden"),
            ("erin", {"members": cim_pb2.GroupRef(group=group)}, "forbidden"),
            ("erin", {"members": cim_pb2.GroupRef(group="team")}, "not_found"),
            ("alice", {"add": cim_pb2.ChangeMembers(group=group, users=["zed"])}, "not_accepted"),
            ("alice", {"create": cim_pb2.CreateGroup(name="")}, "bad_request"),
            ("alice", {"rename": cim_pb2.RenameGroup(group="", name="x")}, "bad_request"),
            ("bob", {"dissolve": cim_pb2.GroupRef(group="team")}, "forbidden"),
            ("alice", {}, "bad_request"),
        ]
        for actor, op, code in cases:
            reply = self.ask(actor, **op)
            self.assertEqual((reply.ok, reply.error), (False, code), (actor, op))
            self.assertTrue(reply.message)
            self.assertFalse(reply.HasField("group"))

    def test_ambiguous_name(self) -> None:
        self.team()
        self.ok(self.groups.create("bob", "team"))
        reply = self.ask("bob", leave=cim_pb2.GroupRef(group="team"))
        self.assertEqual(reply.error, "bad_request")
        self.assertIn("use the group id", reply.message)
        self.assertEqual(len(self.ok(self.groups.list_for("bob"))), 2)

    def test_dissolved(self) -> None:
        group = self.team().id
        self.ok(self.groups.dissolve("alice", group))
        reply = self.ask("alice", add=cim_pb2.ChangeMembers(group=group, users=["erin"]))
        self.assertEqual(reply.error, "conflict")

    def test_unexpected_failure_is_answered_and_logged(self) -> None:
        group = self.team().id
        self.successResultOf(self.db.stop())
        reply = self.ask("alice", members=cim_pb2.GroupRef(group=group))
        self.assertEqual((reply.ok, reply.error), (False, "internal"))
        self.assertNotIn("Database", reply.message)
        self.assertEqual(len(self.flushLoggedErrors()), 1)


class AccountDeletionTests(GroupTestsMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def test_leave_all_groups_before_deleting_a_user(self) -> None:
        team = self.team()
        solo = self.ok(self.groups.create("alice", "solo"))
        other = self.ok(self.groups.create("carol", "other", ["alice"]))
        outcomes = self.ok(self.db.run(leave_all_groups_txn, "alice", START + 1))
        self.assertEqual(
            sorted(outcomes, key=lambda o: o.group_id),
            sorted(
                [
                    LeaveRecord(team.id, "bob", False),
                    LeaveRecord(solo.id, None, True),
                    LeaveRecord(other.id, None, False),
                ],
                key=lambda o: o.group_id,
            ),
        )
        self.assertTrue(self.ok(self.db.run(delete_user_txn, "alice")))
        self.assertEqual(self.ok(self.groups.list_for("bob"))[0].owner, "bob")

    def test_deleting_a_user_removes_their_memberships(self) -> None:
        team = self.team()
        self.assertTrue(self.ok(self.db.run(delete_user_txn, "carol")))
        self.groups.forget(team.id)
        self.assertEqual(self.names(team.id), ["alice", "bob", "dave"])


class NodeRuleTests(GroupTestsMixin, TestCase):
    """The IM node's rules that ask a collaborator, through the real ones.

    tests/unit/test_delivery.py proves the message flow against ``FakeGroups`` and
    ``KnownUsers``; here the node's "only members can post" check and its "does the
    receiver exist" check run through ``GroupDirectory`` and ``AccountStore`` on the
    database a daemon uses, and GROUP_R changes reach the next post's check.
    """

    def database_url(self) -> str:
        return sqlite_url(self)

    def setUp(self) -> None:
        super().setUp()
        self.node = NodeHarness(database=self.db)
        # The directory and accounts on the node's clock, as the daemon builds them.
        self.groups = GroupDirectory(self.db, self.node.clock)
        accounts = AccountStore(
            self.db, parse_config("[node]\nid = node1\n").accounts, reactor=self.node.clock
        )
        self.node.im.directory.groups = self.groups
        self.node.im.directory.user_exists = accounts.exists

    def unread(self, user: str) -> dict[str, int]:
        states = self.ok(self.node.timelines.summary(user, "phone"))
        return {state.conversation: state.unread for state in states if state.unread}

    def post(self, client: ConnectedClient, group: str, text: str, seq: int) -> None:
        client.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(group=group, text=text, client_seq=seq))
        settle(self.node)

    def test_a_stranger_cannot_post_to_a_group(self) -> None:
        team = self.team()
        erin = self.node.connect("erin")
        bob = self.node.connect("bob", auto_ack=True)
        self.post(erin, team.id, "let me in", 1)
        [error] = erin.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            (error.code, error.client_seq, error.message),
            (cim_pb2.Error.BAD_REQUEST, 1, "only members can post to a group"),
        )
        self.assertEqual(erin.events.of_type(cim_pb2.MSG_A), [])
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        self.assertEqual(self.node.metrics.messages["group"], 0)

    def test_a_members_post_fans_out_to_the_other_members(self) -> None:
        team = self.team()
        alice = self.node.connect("alice")
        bob = self.node.connect("bob", auto_ack=True)
        carol = self.node.connect("carol", auto_ack=True)
        erin = self.node.connect("erin", auto_ack=True)  # not a member
        self.post(alice, team.id, "hello team", 1)
        [msg_a] = alice.events.of_type(cim_pb2.MSG_A)
        [ack_n] = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(
            (ack_n.msg_id, ack_n.status, ack_n.to), (msg_a.msg_id, cim_pb2.ACCEPTED, team.id)
        )
        for member in (bob, carol):
            [received] = member.events.of_type(cim_pb2.MSG_N)
            self.assertEqual(
                (received.id, received.group, received.group_seq, received.text),
                (msg_a.msg_id, team.id, 1, "hello team"),
            )
            self.assertEqual(getattr(received, "from"), "alice")
        self.assertEqual(alice.events.of_type(cim_pb2.MSG_N), [])
        self.assertEqual(erin.events.of_type(cim_pb2.MSG_N), [])
        # dave is a member but not connected: nothing is written for him, he reads the
        # message from his cursor at his next catch-up.
        self.assertEqual(self.node.metrics.messages["group_delivered"], 2)
        self.assertEqual(self.node.metrics.messages["group_missed"], 0)
        self.assertEqual(self.unread("dave"), {f"g:{team.id}": 1})

    def test_an_offline_member_reads_it_from_the_groups_timeline(self) -> None:
        team = self.team()
        alice = self.node.connect("alice")
        self.post(alice, team.id, "for later", 1)
        for member in ("bob", "carol", "dave"):
            self.assertEqual(self.unread(member), {f"g:{team.id}": 1}, member)
        self.assertEqual(self.unread("erin"), {})  # not a member
        dave = self.node.connect("dave")
        dave.protocol.send(cim_pb2.OFFLINE_R, cim_pb2.OfflineR(request_id=1))
        settle(self.node)
        [page] = dave.events.of_type(cim_pb2.OFFLINE_A)
        self.assertEqual(
            [(m.text, m.seq, m.group_seq) for m in page.messages], [("for later", 1, 1)]
        )

    def test_a_member_who_joins_later_does_not_inherit_old_unread(self) -> None:
        team = self.team()
        alice = self.node.connect("alice")
        self.post(alice, team.id, "before erin", 1)
        self.ok(self.groups.add("alice", team.id, ["erin"]))
        self.post(alice, team.id, "after erin", 2)
        self.assertEqual(self.unread("erin"), {f"g:{team.id}": 1})
        self.ok(self.groups.remove("alice", team.id, ["erin"]))
        self.assertEqual(self.unread("erin"), {})

    def test_a_member_removed_over_group_r_can_no_longer_post(self) -> None:
        team = self.team()
        alice = self.node.connect("alice")
        carol = self.node.connect("carol", auto_ack=True)
        self.post(carol, team.id, "still here", 1)
        self.assertEqual(carol.events.of_type(cim_pb2.ACK_N)[0].status, cim_pb2.ACCEPTED)
        alice.protocol.send(
            cim_pb2.GROUP_R,
            cim_pb2.GroupRequest(
                request_id=5, remove=cim_pb2.ChangeMembers(group=team.id, users=["carol"])
            ),
        )
        settle(self.node)
        [answer] = alice.events.of_type(cim_pb2.GROUP_A)
        self.assertEqual((answer.request_id, answer.ok), (5, True))
        self.post(carol, team.id, "am I still in?", 2)
        [error] = carol.events.of_type(cim_pb2.ERROR)
        self.assertEqual((error.client_seq, error.message), (2, "only members can post to a group"))
        self.assertEqual(len(alice.events.of_type(cim_pb2.MSG_N)), 1)  # only the first

    def test_a_dissolved_group_takes_no_posts(self) -> None:
        team = self.team()
        alice = self.node.connect("alice")
        self.ok(self.groups.dissolve("alice", team.id))
        self.post(alice, team.id, "anyone?", 1)
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual(error.message, "only members can post to a group")

    def test_a_group_created_over_group_r_takes_its_members_posts(self) -> None:
        alice = self.node.connect("alice")
        bob = self.node.connect("bob", auto_ack=True)
        alice.protocol.send(
            cim_pb2.GROUP_R,
            cim_pb2.GroupRequest(
                request_id=1, create=cim_pb2.CreateGroup(name="new", members=["bob"])
            ),
        )
        settle(self.node)
        [answer] = alice.events.of_type(cim_pb2.GROUP_A)
        self.assertTrue(answer.ok)
        self.post(alice, answer.group.id, "first", 1)
        self.assertEqual([m.text for m in bob.events.of_type(cim_pb2.MSG_N)], ["first"])

    def test_a_message_to_someone_without_an_account_fails(self) -> None:
        alice = self.node.connect("alice")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="nobody", text="hi", client_seq=1))
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="frank", text="hi", client_seq=2))
        settle(self.node)
        outcomes = {a.client_seq: (a.status, a.reason) for a in alice.events.of_type(cim_pb2.ACK_N)}
        self.assertEqual(
            outcomes,
            {
                1: (cim_pb2.FAILED, "no such user"),
                2: (cim_pb2.STORED, ""),
            },
        )

    def test_an_offline_account_holder_gets_it_stored_and_a_deleted_one_does_not(self) -> None:
        alice = self.node.connect("alice")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="frank", text="hi", client_seq=1))
        settle(self.node)
        self.assertTrue(self.ok(self.db.run(delete_user_txn, "frank")))
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="frank", text="hi", client_seq=2))
        settle(self.node)
        outcomes = [(a.status, a.reason) for a in alice.events.of_type(cim_pb2.ACK_N)]
        self.assertEqual(outcomes, [(cim_pb2.STORED, ""), (cim_pb2.FAILED, "no such user")])

    def test_only_members_read_a_groups_history_and_a_removed_one_no_longer(self) -> None:
        self.node.im.stores.history = HistoryService(self.node.timelines, self.groups.is_member)
        team = self.team()
        carol = self.node.connect("carol")
        erin = self.node.connect("erin")  # has an account, is no member
        alice = self.node.connect("alice")
        for n in range(3):
            self.post(alice, team.id, f"post {n}", n + 1)

        def ask(client: ConnectedClient) -> cim_pb2.HistoryA:
            client.protocol.send(cim_pb2.HISTORY_R, cim_pb2.HistoryR(group=team.id))
            settle(self.node)
            return client.events.of_type(cim_pb2.HISTORY_A)[-1]

        self.assertEqual([m.text for m in ask(carol).messages], ["post 2", "post 1", "post 0"])
        refused = ask(erin)
        self.assertEqual((refused.error, list(refused.messages)), ("forbidden", []))
        alice.protocol.send(
            cim_pb2.GROUP_R,
            cim_pb2.GroupRequest(
                request_id=3, remove=cim_pb2.ChangeMembers(group=team.id, users=["carol"])
            ),
        )
        settle(self.node)
        self.assertTrue(alice.events.of_type(cim_pb2.GROUP_A)[-1].ok)
        self.assertEqual(ask(carol).error, "forbidden")
