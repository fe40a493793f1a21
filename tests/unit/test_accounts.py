"""cim.accounts: password hashing, account rules, and the KDF kept off the reactor.

Every test uses scrypt_n = 1024 so the suite stays fast; the database runs on a
temporary SQLite file with a synchronous runner, and the KDF on a counting runner
that shows when (and how often) a hash was computed or checked.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import select
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cim.accounts.store import (
    AccountStore,
    BlockingAccountStore,
    InvalidUserKind,
    InvalidUserName,
    NoSuchUser,
    ReservedUserName,
    UserExists,
    WeakPassword,
    check_new_user_name,
    check_user_name,
    hash_password,
    verify_password,
)
from cim.config import AccountsConfig
from cim.storage.database import Database, PoolNotRunning, create_engine_for
from cim.storage.schema import users
from tests.unit.test_storage import QueuedRunner, run_now, sqlite_url

T = TypeVar("T")

FAST = AccountsConfig(scrypt_n=1024, scrypt_r=8, scrypt_p=1, min_password_length=8)
PASSWORD = "correct horse"

VALID_NAMES = ["a", "Z", "7", "alice", "Alice", "bob.smith", "x_y-z", "0day", "a" * 64]
INVALID_NAMES = [
    "",
    "a" * 65,
    ".alice",
    "_alice",
    "-alice",
    "al ice",
    "alice\n",
    "al@ce",
    "al/ce",
    "émile",
    "ｆｕｌｌ",  # noqa: RUF001 - full-width letters must not pass as ASCII
]


class CountingRunner:
    """Runs the KDF at once and counts the runs."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, work: Callable[[], T]) -> Deferred[T]:
        self.runs += 1
        return maybeDeferred(work)


class HashingTests(TestCase):
    def test_round_trip(self) -> None:
        encoded = hash_password(PASSWORD, FAST)
        self.assertTrue(verify_password(PASSWORD, encoded))

    def test_wrong_password(self) -> None:
        encoded = hash_password(PASSWORD, FAST)
        self.assertFalse(verify_password("correct horsE", encoded))
        self.assertFalse(verify_password("", encoded))

    def test_format_is_self_describing(self) -> None:
        salt = b"0123456789abcdef"
        config = AccountsConfig(scrypt_n=2048, scrypt_r=4, scrypt_p=2)
        encoded = hash_password(PASSWORD, config, salt=salt)
        scheme, n, r, p, salt_b64, hash_b64 = encoded.split("$")
        self.assertEqual((scheme, n, r, p), ("scrypt", "2048", "4", "2"))
        self.assertEqual(base64.b64decode(salt_b64), salt)
        self.assertEqual(len(base64.b64decode(hash_b64)), 32)
        self.assertNotIn(PASSWORD, encoded)
        self.assertEqual(hash_password(PASSWORD, config, salt=salt), encoded)

    def test_salt_is_random(self) -> None:
        self.assertNotEqual(hash_password(PASSWORD, FAST), hash_password(PASSWORD, FAST))

    def test_verify_uses_the_parameters_in_the_hash(self) -> None:
        """Raising the cost in config must not lock out users hashed at the old cost."""
        old = hash_password(PASSWORD, AccountsConfig(scrypt_n=1024, scrypt_r=2))
        self.assertTrue(verify_password(PASSWORD, old))

    def test_unicode_password(self) -> None:
        encoded = hash_password("pässwörd✓", FAST)
        self.assertTrue(verify_password("pässwörd✓", encoded))

    def test_malformed_hashes_match_nothing(self) -> None:
        good = hash_password(PASSWORD, FAST)
        scheme, n, r, p, salt, digest = good.split("$")
        for encoded in [
            "",
            PASSWORD,
            "scrypt$1024$8$1$" + salt,
            "$".join(["bcrypt", n, r, p, salt, digest]),
            "$".join([scheme, "1000", r, p, salt, digest]),  # not a power of 2
            "$".join([scheme, str(1 << 24), r, p, salt, digest]),  # too costly
            "$".join([scheme, n, "0", p, salt, digest]),
            "$".join([scheme, n, r, "-1", salt, digest]),
            "$".join([scheme, n, r, p, "!!", digest]),
            "$".join([scheme, n, r, p, salt, digest[:8]]),
        ]:
            self.assertFalse(verify_password(PASSWORD, encoded), encoded)

    def test_hash_refuses_parameters_beyond_two_gib(self) -> None:
        config = AccountsConfig(scrypt_n=1 << 20, scrypt_r=32)
        self.assertRaises(ValueError, hash_password, PASSWORD, config)


class NameRuleTests(TestCase):
    def test_valid_names(self) -> None:
        for name in VALID_NAMES:
            check_user_name(name)

    def test_invalid_names(self) -> None:
        for name in INVALID_NAMES:
            self.assertRaises(InvalidUserName, check_user_name, name)

    def test_reserved_names(self) -> None:
        config = AccountsConfig(reserved_names=("support", "Help.Desk"))
        for name in ("system", "admin", "root", "SYSTEM", "Admin", "rOOt", "@x", "@system"):
            self.assertRaises(ReservedUserName, check_new_user_name, name, FAST)
        for name in ("support", "SUPPORT", "help.desk"):
            self.assertRaises(ReservedUserName, check_new_user_name, name, config)
        for name in ("administrator", "rooted", "systems", "support"):
            check_new_user_name(name, FAST)
        self.assertRaises(InvalidUserName, check_new_user_name, ".alice", FAST)
        check_user_name("admin")  # looking an existing account up is not creating one


class AccountStoreTests(TestCase):
    def setUp(self) -> None:
        self.db = Database(sqlite_url(self), None, runner=run_now)
        self.successResultOf(self.db.start())
        self.addCleanup(self.db.stop)
        self.kdf = CountingRunner()
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = AccountStore(self.db, FAST, kdf_runner=self.kdf, reactor=self.clock)
        self.store.start()
        self.addCleanup(self.store.stop)

    def add(self, name: str = "alice", password: str = PASSWORD, kind: str = "person") -> None:
        self.successResultOf(self.store.add_user(name, password, kind))

    def stored_hash(self, name: str) -> str:
        engine = create_engine_for(self.db.url)
        self.addCleanup(engine.dispose)
        with engine.connect() as connection:
            query = select(users.c.password_hash).where(users.c.name == name)
            return str(connection.execute(query).scalar_one())

    def test_add_then_check(self) -> None:
        self.add()
        self.assertEqual(self.kdf.runs, 1)
        self.assertTrue(self.successResultOf(self.store.check_password("alice", PASSWORD)))
        self.assertFalse(self.successResultOf(self.store.check_password("alice", "wrong pass")))
        self.assertEqual(self.kdf.runs, 3)
        self.assertTrue(self.successResultOf(self.store.exists("alice")))

    def test_password_stored_hashed(self) -> None:
        self.add()
        stored = self.stored_hash("alice")
        self.assertTrue(stored.startswith("scrypt$1024$8$1$"))
        self.assertNotIn(PASSWORD, stored)

    def test_unknown_user_still_runs_the_kdf(self) -> None:
        self.assertFalse(self.successResultOf(self.store.check_password("nobody", PASSWORD)))
        self.assertEqual(self.kdf.runs, 1)
        self.assertFalse(self.successResultOf(self.store.check_password("bad name!", PASSWORD)))
        self.assertEqual(self.kdf.runs, 2)

    def test_dummy_hash_costs_what_a_real_one_costs(self) -> None:
        """The dummy carries today's parameters, so the KDF does the same work."""
        self.add()
        real = self.stored_hash("alice").split("$")[:4]
        self.assertEqual(self.store._dummy_hash.split("$")[:4], real)

    def test_unknown_user_does_not_match_dummy(self) -> None:
        """Even a password equal to anything about the dummy cannot log in."""
        for password in ["", PASSWORD, self.store._dummy_hash]:
            self.assertFalse(self.successResultOf(self.store.check_password("nobody", password)))

    def test_kdf_not_run_inline_without_runner(self) -> None:
        """The default KDF runner is a thread pool: without start() nothing runs."""
        store = AccountStore(self.db, FAST, reactor=self.clock)
        self.failureResultOf(store.check_password("alice", PASSWORD), PoolNotRunning)

    def test_names_are_checked(self) -> None:
        for name in INVALID_NAMES:
            self.failureResultOf(self.store.add_user(name, PASSWORD), InvalidUserName)
        self.assertEqual(self.kdf.runs, 0)
        for name in VALID_NAMES:
            self.add(name)
        listed = self.successResultOf(self.store.list_users())
        self.assertEqual(sorted(listed), sorted(VALID_NAMES))

    def test_reserved_names_are_refused_before_the_kdf(self) -> None:
        """Issue 17, acceptance 5: no path through add_user creates a reserved name."""
        for name in ("system", "admin", "root", "Root", "@x"):
            failure = self.failureResultOf(self.store.add_user(name, PASSWORD), ReservedUserName)
            self.assertIn("is reserved", str(failure.value))
        self.assertEqual(self.kdf.runs, 0)
        self.assertEqual(self.successResultOf(self.store.list_users()), [])

    def test_an_existing_reserved_account_keeps_working(self) -> None:
        """One made before the rule (here: straight into the database) is not locked out."""
        from cim.storage.accounts import insert_user_txn

        encoded = hash_password(PASSWORD, FAST)
        self.successResultOf(self.db.run(insert_user_txn, "admin", encoded, "person", 1.0))
        self.assertTrue(self.successResultOf(self.store.check_password("admin", PASSWORD)))
        self.successResultOf(self.store.set_password("admin", "new password"))
        self.assertTrue(self.successResultOf(self.store.delete_user("admin")))

    def test_names_are_case_sensitive(self) -> None:
        self.add("alice")
        self.add("Alice", "another password")
        self.assertTrue(self.successResultOf(self.store.check_password("alice", PASSWORD)))
        self.assertFalse(self.successResultOf(self.store.check_password("ALICE", PASSWORD)))

    def test_weak_password_refused_before_the_kdf(self) -> None:
        failure = self.failureResultOf(self.store.add_user("alice", "Qz7#"), WeakPassword)
        self.assertIn("at least 8", str(failure.value))
        self.assertNotIn("Qz7#", str(failure.value))
        self.failureResultOf(self.store.add_user("alice", "x" * 1025), WeakPassword)
        self.assertEqual(self.kdf.runs, 0)
        self.assertFalse(self.successResultOf(self.store.exists("alice")))

    def test_duplicate_user(self) -> None:
        self.add()
        failure = self.failureResultOf(self.store.add_user("alice", "other password"), UserExists)
        self.assertEqual(failure.value.name, "alice")
        self.assertTrue(self.successResultOf(self.store.check_password("alice", PASSWORD)))

    def test_kind(self) -> None:
        self.add("watch1", kind="device")
        self.add("bob")
        record = self.successResultOf(self.store.get_user("watch1"))
        assert record is not None
        self.assertEqual((record.name, record.kind, record.created_at), ("watch1", "device", 1000))
        bob = self.successResultOf(self.store.get_user("bob"))
        assert bob is not None
        self.assertEqual(bob.kind, "person")
        self.failureResultOf(self.store.add_user("robot", PASSWORD, "robot"), InvalidUserKind)
        self.assertIsNone(self.successResultOf(self.store.get_user("robot")))

    def test_set_password(self) -> None:
        self.add()
        self.successResultOf(self.store.set_password("alice", "new password"))
        self.assertFalse(self.successResultOf(self.store.check_password("alice", PASSWORD)))
        self.assertTrue(self.successResultOf(self.store.check_password("alice", "new password")))
        self.failureResultOf(self.store.set_password("alice", "short"), WeakPassword)
        self.failureResultOf(self.store.set_password("nobody", "new password"), NoSuchUser)
        self.failureResultOf(self.store.set_password("bad name", "new password"), NoSuchUser)

    def test_delete_user(self) -> None:
        self.add()
        self.assertTrue(self.successResultOf(self.store.delete_user("alice")))
        self.assertFalse(self.successResultOf(self.store.delete_user("alice")))
        self.assertFalse(self.successResultOf(self.store.delete_user("bad name")))
        self.assertFalse(self.successResultOf(self.store.exists("alice")))
        self.assertFalse(self.successResultOf(self.store.check_password("alice", PASSWORD)))

    def test_list_users_sorted(self) -> None:
        for name in ["carol", "alice", "bob"]:
            self.add(name)
        self.assertEqual(self.successResultOf(self.store.list_users()), ["alice", "bob", "carol"])

    def test_stop_waits_for_running_checks(self) -> None:
        self.add()
        queued = QueuedRunner()
        store = AccountStore(self.db, FAST, kdf_runner=queued, reactor=self.clock)
        store.start()
        checked = store.check_password("alice", PASSWORD)
        stopped = store.stop()
        self.assertNoResult(stopped)
        self.failureResultOf(store.check_password("alice", PASSWORD), PoolNotRunning)
        queued.run_all()
        self.assertTrue(self.successResultOf(checked))
        self.successResultOf(stopped)


class BlockingAccountStoreTests(TestCase):
    def setUp(self) -> None:
        url = sqlite_url(self)
        db = Database(url, None, runner=run_now)
        self.successResultOf(db.start())
        self.successResultOf(db.stop())
        self.engine = create_engine_for(url)
        self.addCleanup(self.engine.dispose)
        self.store = BlockingAccountStore(self.engine, FAST, clock=lambda: 42.0)

    def test_same_rules_inline(self) -> None:
        self.store.add_user("alice", PASSWORD)
        self.store.add_user("watch1", PASSWORD, kind="device")
        self.assertRaises(UserExists, self.store.add_user, "alice", PASSWORD)
        self.assertRaises(InvalidUserName, self.store.add_user, "-x", PASSWORD)
        self.assertRaises(ReservedUserName, self.store.add_user, "admin", PASSWORD)
        self.assertRaises(WeakPassword, self.store.add_user, "bob", "short")
        self.assertTrue(self.store.check_password("alice", PASSWORD))
        self.assertFalse(self.store.check_password("nobody", PASSWORD))
        listed = [(r.name, r.kind, r.created_at) for r in self.store.list_users()]
        self.assertEqual(listed, [("alice", "person", 42.0), ("watch1", "device", 42.0)])

        self.store.set_password("alice", "new password")
        self.assertTrue(self.store.check_password("alice", "new password"))
        self.assertRaises(NoSuchUser, self.store.set_password, "nobody", "new password")

        self.assertTrue(self.store.delete_user("alice"))
        self.assertFalse(self.store.delete_user("alice"))
        self.assertFalse(self.store.exists("alice"))
