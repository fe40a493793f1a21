"""cim.limits on a fake clock: token buckets, the bounded key table, the node's limits
with a user's own rates, the msg:R gate (refusals, retry-after, order marks), the
per-user rates read from the database, and the [limits] section."""

from __future__ import annotations

import os

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.config import ConfigError, LimitsConfig, parse_config, parse_rate
from cim.limits.buckets import UNLIMITED, Rate, TokenBuckets
from cim.limits.keys import IdleKeys
from cim.limits.messages import MARK_GRACE, MessageGate, Refusal, retry_after_ms
from cim.limits.overrides import StoredOverrides
from cim.limits.policy import (
    GROUP_MESSAGES,
    GROUP_POSTS,
    HELLOS,
    MESSAGES,
    USER_KINDS,
    Limits,
)
from cim.protocols import cim_pb2
from cim.storage.database import Database
from cim.storage.limits import (
    reset_user_limits_txn,
    set_user_limits_txn,
    user_limits_txn,
)
from tests.fakes.timelines import run_now
from tests.unit.test_bus_memory import LogCapture

RATE_LIMITED = cim_pb2.Error.RATE_LIMITED
UNAVAILABLE = cim_pb2.Error.UNAVAILABLE


def message(seq: int, to: str = "bob", group: str = "") -> cim_pb2.Message:
    if group:
        return cim_pb2.Message(group=group, text=f"m{seq}", client_seq=seq)
    return cim_pb2.Message(to=to, text=f"m{seq}", client_seq=seq)


class TokenBucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.buckets = TokenBuckets(self.clock, Rate(2.0, 3))

    def test_a_burst_then_the_rate(self) -> None:
        self.assertEqual([self.buckets.take("alice") for _ in range(3)], [0.0] * 3)
        self.assertAlmostEqual(self.buckets.take("alice"), 0.5)
        self.assertEqual(self.buckets.take("bob"), 0.0)  # another key is not affected
        self.clock.advance(0.25)
        self.assertAlmostEqual(self.buckets.take("alice"), 0.25)  # refused: nothing taken
        self.clock.advance(0.25)
        self.assertEqual(self.buckets.take("alice"), 0.0)
        self.assertAlmostEqual(self.buckets.wait("alice"), 0.5)
        self.clock.advance(10)
        self.assertEqual([self.buckets.take("alice") for _ in range(3)], [0.0] * 3)
        self.assertGreater(self.buckets.take("alice"), 0)  # the burst never grows past 3

    def test_a_key_of_its_own_rate(self) -> None:
        own = Rate(100.0, 50)
        self.assertEqual([self.buckets.take("bot", own) for _ in range(50)], [0.0] * 50)
        self.assertAlmostEqual(self.buckets.take("bot", own), 0.01)
        self.assertEqual(self.buckets.take("bot", UNLIMITED), 0.0)

    def test_give_back(self) -> None:
        for _ in range(3):
            self.buckets.take("alice")
        self.buckets.give_back("alice")
        self.assertEqual(self.buckets.take("alice"), 0.0)
        self.assertGreater(self.buckets.take("alice"), 0)
        self.buckets.give_back("nobody")
        self.assertEqual(len(self.buckets), 1)

    def test_full_buckets_are_forgotten_and_memory_is_bounded(self) -> None:
        for n in range(1000):
            self.buckets.take(f"address{n}")
        self.assertEqual(len(self.buckets), 1000)
        self.clock.advance(0.5)  # one token back each: full again, worth nothing
        self.buckets.take("late")
        self.assertEqual(len(self.buckets), 1)
        small = TokenBuckets(self.clock, Rate(1.0, 1), max_keys=10)
        for n in range(100):
            small.take(f"address{n}")
        self.assertEqual(len(small), 10)

    def test_unlimited_remembers_nothing(self) -> None:
        buckets = TokenBuckets(self.clock, UNLIMITED)
        self.assertEqual([buckets.take("x") for _ in range(1000)], [0.0] * 1000)
        self.assertEqual(len(buckets), 0)

    def test_rates_must_make_sense(self) -> None:
        self.assertRaises(ValueError, Rate, -1.0, 1)
        self.assertRaises(ValueError, Rate, 1.0, 0)


class IdleKeysTests(SynchronousTestCase):
    def test_sweeps_idle_keys_from_the_front_and_caps_the_count(self) -> None:
        keys: IdleKeys[str, float] = IdleKeys(3, lambda until, now: until <= now)
        keys.touch("a", 1.0)
        keys.touch("b", 5.0)
        keys.touch("c", 2.0)
        keys.sweep(3.0)  # "a" goes; "b" is not idle, so "c" waits behind it
        self.assertEqual(len(keys), 2)
        keys.touch("d", 9.0)
        keys.touch("e", 9.0)
        self.assertIsNone(keys.get("b"))  # the least recently touched went first
        self.assertEqual(len(keys), 3)
        self.assertRaises(ValueError, IdleKeys, 0, lambda state, now: True)


class ConfigTests(SynchronousTestCase):
    def test_rates(self) -> None:
        self.assertEqual(parse_rate("20/s"), 20.0)
        self.assertEqual(parse_rate("30/m"), 0.5)
        self.assertEqual(parse_rate("36 / h"), 0.01)
        self.assertEqual(parse_rate("5"), 5.0)
        self.assertEqual(parse_rate("off"), 0.0)
        self.assertRaises(ValueError, parse_rate, "fast")
        self.assertRaises(ValueError, parse_rate, "5/d")

    def test_the_section(self) -> None:
        config = parse_config(
            "[node]\nid = n\n[limits]\nmessages = 2/s\nmessages_burst = 4\nhellos = off\n"
        ).limits
        self.assertEqual((config.messages, config.messages_burst), (2.0, 4))
        self.assertEqual(config.hellos, 0.0)
        self.assertEqual(config.group_backlog, LimitsConfig().group_backlog)
        with self.assertRaises(ConfigError) as raised:
            parse_config("[node]\nid = n\n[limits]\nmessages = quickly\n")
        self.assertIn("[limits] messages = 'quickly': expected a rate", str(raised.exception))
        with self.assertRaises(ConfigError):
            parse_config("[node]\nid = n\n[limits]\nmessages_burst = 0\n")


class FixedOverrides:
    def __init__(self) -> None:
        self.rates: dict[tuple[str, str], Rate] = {}

    def rate(self, user: str, kind: str) -> Rate | None:
        return self.rates.get((user, kind))


def limits(clock: Clock, overrides: FixedOverrides | None = None, **keys: float) -> Limits:
    return Limits(clock, LimitsConfig(**keys), overrides or FixedOverrides())  # type: ignore[arg-type]


class LimitsTests(SynchronousTestCase):
    def test_each_kind_has_its_own_buckets_and_a_user_may_have_own_rates(self) -> None:
        clock = Clock()
        overrides = FixedOverrides()
        node = limits(clock, overrides, messages=1.0, messages_burst=2, hellos=1.0, hellos_burst=1)
        self.assertEqual([node.take(MESSAGES, "alice") for _ in range(2)], [0.0, 0.0])
        self.assertGreater(node.take(MESSAGES, "alice"), 0)
        self.assertEqual(node.take(HELLOS, "alice"), 0.0)  # a different kind
        overrides.rates[("alice", MESSAGES)] = Rate(1000.0, 1000)
        self.assertEqual([node.take(MESSAGES, "alice") for _ in range(500)], [0.0] * 500)
        self.assertEqual(node.rate(MESSAGES, "alice"), Rate(1000.0, 1000))
        self.assertEqual(node.rate(MESSAGES, "bob"), Rate(1.0, 2))
        # Only per-user kinds have own rates: an address named like a user has none.
        overrides.rates[("10.0.0.1", HELLOS)] = Rate(1000.0, 1000)
        node.take(HELLOS, "10.0.0.1")
        self.assertGreater(node.take(HELLOS, "10.0.0.1"), 0)
        self.assertEqual(set(USER_KINDS) & {HELLOS, GROUP_MESSAGES}, set())


class GateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limits = limits(
            self.clock,
            messages=2.0,
            messages_burst=2,
            group_posts=1.0,
            group_posts_burst=5,
            group_messages=1.0,
            group_messages_burst=1,
        )
        self.backlog: dict[str, Refusal] = {}
        self.store_wait = 0.0
        self.gate = MessageGate(
            self.clock,
            self.limits,
            backlog=self.backlog.get,
            store_wait=lambda: self.store_wait,
        )

    def check(self, seq: int, to: str = "bob", group: str = "") -> Refusal | None:
        return self.gate.check("alice", "phone", message(seq, to, group))

    def test_over_the_rate_is_rate_limited_with_a_retry_after(self) -> None:
        self.assertIsNone(self.check(1))
        self.assertIsNone(self.check(2))
        refusal = self.check(3)
        assert refusal is not None
        self.assertEqual(refusal.code, RATE_LIMITED)
        self.assertAlmostEqual(refusal.retry_after, 0.5)
        error = refusal.error(3)
        self.assertEqual(
            (error.code, error.client_seq, error.request_type, error.retry_after_ms),
            (RATE_LIMITED, 3, cim_pb2.MSG_R, 500),
        )
        self.clock.advance(0.5)
        self.assertIsNone(self.check(3))

    def test_a_later_message_never_overtakes_a_refused_one(self) -> None:
        self.check(1)
        self.check(2)
        self.assertIsNotNone(self.check(3))
        self.clock.advance(1.0)  # two tokens again, but 3 has not been sent again
        held = self.check(4)
        assert held is not None
        self.assertEqual(held.code, RATE_LIMITED)
        self.assertIn("earlier message", held.text)
        self.assertIsNone(self.check(5, to="carol"))  # another conversation goes on
        self.assertIsNone(self.check(3))
        self.assertEqual(len(self.gate), 0)
        self.clock.advance(0.5)
        self.assertIsNone(self.check(4))

    def test_a_mark_expires_when_its_message_never_comes_back(self) -> None:
        self.check(1)
        self.check(2)
        self.assertIsNotNone(self.check(3))
        self.clock.advance(0.5 + MARK_GRACE)
        self.assertIsNone(self.check(4))
        self.assertEqual(len(self.gate), 0)

    def test_group_posts_count_the_sender_and_the_group_and_give_back_on_refusal(self) -> None:
        self.assertIsNone(self.check(1, group="g"))
        refusal = self.check(2, group="g")  # the group had one token
        assert refusal is not None
        self.assertIn("group", refusal.text)
        # The refused post took nothing: alice still has her second message token.
        self.assertIsNone(self.check(3, to="bob"))

    def test_a_full_backlog_and_a_lagging_archive_refuse_before_any_token(self) -> None:
        self.backlog["g"] = Refusal(RATE_LIMITED, 1.0, "backlog")
        self.assertEqual(self.check(1, group="g"), self.backlog["g"])
        self.store_wait = 1.0
        refusal = self.check(1, to="bob")
        assert refusal is not None
        self.assertEqual((refusal.code, refusal.retry_after), (UNAVAILABLE, 1.0))
        self.store_wait = 0.0
        self.assertIsNone(self.check(1, to="bob"))
        self.assertIsNone(self.check(2, to="bob"))  # both tokens were still there

    def test_retry_after_ms_rounds_up(self) -> None:
        self.assertEqual(retry_after_ms(0.0001), 1)
        self.assertEqual(retry_after_ms(0.0015), 2)
        self.assertEqual(retry_after_ms(2.0), 2000)


class StoredOverridesTests(SynchronousTestCase):
    def setUp(self) -> None:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        self.db = Database(f"sqlite:///{path}/cim.db", None, runner=run_now)  # type: ignore[arg-type]
        self.successResultOf(self.db.start())
        self.addCleanup(self.db.stop)
        self.successResultOf(
            self.db.run(
                lambda c: c.exec_driver_sql(
                    "INSERT INTO users (name, password_hash, kind, created_at) "
                    "VALUES ('alice', 'x', 'person', 0)"
                )
            )
        )

    def test_reads_the_table_now_and_every_refresh(self) -> None:
        clock = Clock()
        overrides = StoredOverrides(self.db, clock, 10.0)
        self.successResultOf(overrides.start())
        self.addCleanup(overrides.stop)
        self.assertIsNone(overrides.rate("alice", MESSAGES))
        self.assertTrue(
            self.successResultOf(
                self.db.run(set_user_limits_txn, "alice", {MESSAGES: (500.0, 900)}, 1.0)
            )
        )
        self.assertIsNone(overrides.rate("alice", MESSAGES))  # until the next read
        clock.advance(10)
        self.assertEqual(overrides.rate("alice", MESSAGES), Rate(500.0, 900))
        self.assertEqual(self.successResultOf(self.db.run(reset_user_limits_txn, "alice")), 1)
        clock.advance(10)
        self.assertIsNone(overrides.rate("alice", MESSAGES))

    def test_a_failed_read_keeps_what_was_read(self) -> None:
        self.successResultOf(
            self.db.run(set_user_limits_txn, "alice", {GROUP_POSTS: (3.0, 4)}, 1.0)
        )
        clock = Clock()
        overrides = StoredOverrides(self.db, clock, 10.0)
        self.successResultOf(overrides.start())
        self.addCleanup(overrides.stop)
        logs = LogCapture(self, "cim.limits.overrides.StoredOverrides")
        self.db.run = lambda *args, **kwargs: fail(OSError("database gone"))  # type: ignore[method-assign]
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(overrides.rate("alice", GROUP_POSTS), Rate(3.0, 4))
        self.assertEqual(len(logs.lines("warn")), 1)

    def test_storage_refuses_unknown_users_and_kinds(self) -> None:
        self.assertFalse(
            self.successResultOf(self.db.run(set_user_limits_txn, "nobody", {MESSAGES: (1, 1)}, 1))
        )
        self.assertIsNone(self.successResultOf(self.db.run(user_limits_txn, "nobody")))
        self.failureResultOf(
            self.db.run(set_user_limits_txn, "alice", {"hellos": (1.0, 1)}, 1.0), ValueError
        )
