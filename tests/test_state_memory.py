"""MemoryStateStore: duplicate-login policies, expiry on a fake clock, bounded memory."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cim.interfaces import AlreadyLoggedIn, IStateStore, SessionRecord
from cim.state import token_hash
from cim.state.memory import MemoryStateStore

T = TypeVar("T")
TTL = 3600.0


class MemoryStateStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryStateStore(self.clock, prune_interval=60)
        self.ended: list[tuple[SessionRecord, str]] = []
        self.store.add_session_ended_listener(lambda record, why: self.ended.append((record, why)))

    def result(self, d: Deferred[T]) -> T:
        return self.successResultOf(d)

    def login(
        self, token: str, user: str, policy: str = "kick_old", ttl: float = TTL, node: str = "n1"
    ) -> tuple[SessionRecord, SessionRecord | None]:
        return self.result(
            self.store.create_session(token_hash(token), user, "phone", node, ttl, policy)
        )

    def sizes(self) -> dict[str, int]:
        store: Any = self.store
        return {
            "sessions": len(store._sessions),
            "users": len(store._token_hash_by_user),
            "online": len(store._online),
            "per_node": len(store._online_per_node),
            "expiry": sum(len(queue) for queue in store._expiry_queues.values()),
            "queues": len(store._expiry_queues),
        }

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IStateStore, self.store))

    def test_create_and_lookup(self) -> None:
        record, previous = self.login("t1", "alice")
        self.assertIsNone(previous)
        self.assertEqual((record.user, record.device, record.node_id), ("alice", "phone", "n1"))
        self.assertEqual(record.created_at, 1000)
        self.assertEqual(record.expires_at, 1000 + TTL)
        self.assertEqual(self.result(self.store.session_for_token(token_hash("t1"))), record)
        self.assertIsNone(self.result(self.store.session_for_token(token_hash("other"))))

    def test_lookup_after_expiry_ends_the_session(self) -> None:
        record, _ = self.login("t1", "alice")
        self.clock.advance(TTL - 1)
        self.assertEqual(self.result(self.store.session_for_token(token_hash("t1"))), record)
        self.clock.advance(1)
        self.assertIsNone(self.result(self.store.session_for_token(token_hash("t1"))))
        self.assertEqual(self.ended, [(record, "expired")])
        self.assertEqual(self.sizes()["sessions"], 0)

    def test_kick_old_ends_previous_and_tells_listeners(self) -> None:
        first, _ = self.login("t1", "alice")
        self.result(self.store.mark_online(first))
        second, previous = self.login("t2", "alice")
        self.assertEqual(previous, first)
        self.assertNotEqual(second.session_id, first.session_id)
        self.assertEqual(self.ended, [(first, "logged in elsewhere")])
        self.assertIsNone(self.result(self.store.session_for_token(token_hash("t1"))))
        self.assertEqual(self.result(self.store.session_for_token(token_hash("t2"))), second)
        # The kicked session's connection was online; the route is gone with it.
        self.assertIsNone(self.result(self.store.route("alice")))

    def test_listener_sees_the_new_session_in_place(self) -> None:
        self.login("t1", "alice")
        seen: list[SessionRecord | None] = []
        self.store.add_session_ended_listener(
            lambda record, why: seen.append(
                self.result(self.store.session_for_token(token_hash("t2")))
            )
        )
        second, _ = self.login("t2", "alice")
        self.assertEqual(seen, [second])

    def test_refuse_new_refuses_only_while_previous_is_online(self) -> None:
        first, _ = self.login("t1", "alice", "refuse_new")
        # Not online yet: a second login replaces it.
        second, previous = self.login("t2", "alice", "refuse_new")
        self.assertEqual(previous, first)
        self.result(self.store.mark_online(second))
        self.failureResultOf(
            self.store.create_session(token_hash("t3"), "alice", "pc", "n1", TTL, "refuse_new"),
            AlreadyLoggedIn,
        )
        self.assertEqual(self.result(self.store.session_for_token(token_hash("t2"))), second)
        self.assertIsNone(self.result(self.store.session_for_token(token_hash("t3"))))
        self.result(self.store.mark_offline(second))
        third, previous = self.login("t3", "alice", "refuse_new")
        self.assertEqual(previous, second)
        self.assertEqual(third.user, "alice")

    def test_refuse_new_ignores_an_expired_online_session(self) -> None:
        first, _ = self.login("t1", "alice", "refuse_new", ttl=100)
        self.result(self.store.mark_online(first))
        self.clock.advance(100)
        _, previous = self.login("t2", "alice", "refuse_new")
        self.assertIsNone(previous)
        self.assertEqual(self.ended, [(first, "expired")])

    def test_unknown_policy_fails(self) -> None:
        self.failureResultOf(
            self.store.create_session(token_hash("t"), "alice", "pc", "n1", TTL, "nope"),
            ValueError,
        )

    def test_token_hash_reuse_fails(self) -> None:
        self.login("t1", "alice")
        self.failureResultOf(
            self.store.create_session(token_hash("t1"), "bob", "pc", "n1", TTL, "kick_old"),
            ValueError,
        )

    def test_mark_offline_of_replaced_session_keeps_new_one_online(self) -> None:
        first, _ = self.login("t1", "alice")
        self.result(self.store.mark_online(first))
        second, _ = self.login("t2", "alice", node="n2")
        self.result(self.store.mark_online(second))
        self.result(self.store.mark_offline(first))
        self.assertEqual(self.result(self.store.route("alice")), "n2")
        self.assertEqual(self.result(self.store.online_count_by_node()), {"n2": 1})

    def test_mark_online_of_ended_session_is_ignored(self) -> None:
        first, _ = self.login("t1", "alice")
        self.login("t2", "alice")
        self.result(self.store.mark_online(first))
        self.assertIsNone(self.result(self.store.route("alice")))

    def test_route_and_counts(self) -> None:
        alice, _ = self.login("ta", "alice", node="n1")
        bob, _ = self.login("tb", "bob", node="n2")
        carol, _ = self.login("tc", "carol", node="n1")
        for record in (alice, bob, carol):
            self.result(self.store.mark_online(record))
        self.assertEqual(self.result(self.store.route("bob")), "n2")
        self.assertIsNone(self.result(self.store.route("dave")))
        self.assertEqual(self.result(self.store.online_count_by_node()), {"n1": 2, "n2": 1})
        self.result(self.store.mark_offline(bob))
        self.assertEqual(self.result(self.store.online_count_by_node()), {"n1": 2})
        self.assertIsNone(self.result(self.store.route("bob")))

    def test_online_users_paging(self) -> None:
        names = [f"user{i:02d}" for i in range(25)]
        for name in reversed(names):
            record, _ = self.login("t-" + name, name)
            self.result(self.store.mark_online(record))
        self.login("t-offline", "zed")
        self.assertEqual(self.result(self.store.online_users(0, 10)), (25, names[:10]))
        self.assertEqual(self.result(self.store.online_users(20, 10)), (25, names[20:]))
        self.assertEqual(self.result(self.store.online_users(30, 10)), (25, []))
        self.failureResultOf(self.store.online_users(-1, 10), ValueError)

    def test_end_session(self) -> None:
        record, _ = self.login("t1", "alice")
        self.result(self.store.mark_online(record))
        self.assertEqual(
            self.result(self.store.end_session(token_hash("t1"), "logged out")), record
        )
        self.assertEqual(self.ended, [(record, "logged out")])
        self.assertIsNone(self.result(self.store.end_session(token_hash("t1"), "logged out")))
        self.assertIsNone(self.result(self.store.route("alice")))
        self.assertEqual(set(self.sizes().values()), {0})

    def test_end_session_of_expired_token_is_unknown(self) -> None:
        record, _ = self.login("t1", "alice", ttl=10)
        self.clock.advance(10)
        self.assertIsNone(self.result(self.store.end_session(token_hash("t1"), "logged out")))
        self.assertEqual(self.ended, [(record, "expired")])

    def test_raising_listener_does_not_break_the_store(self) -> None:
        def broken(record: SessionRecord, why: str) -> None:
            raise RuntimeError("listener bug")

        self.store = MemoryStateStore(self.clock)
        after: list[str] = []
        self.store.add_session_ended_listener(broken)
        self.store.add_session_ended_listener(lambda record, why: after.append(why))
        self.login("t1", "alice")
        second, previous = self.login("t2", "alice")
        self.assertIsNotNone(previous)
        self.assertEqual(after, ["logged in elsewhere"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.result(self.store.session_for_token(token_hash("t2"))), second)

    def test_prune_releases_expired_sessions(self) -> None:
        self.store.start()
        self.addCleanup(self.store.stop)
        for i in range(50):
            record, _ = self.login(f"short{i}", f"s{i}", ttl=100)
            self.result(self.store.mark_online(record))
        for i in range(30):
            self.login(f"long{i}", f"l{i}", ttl=1000)
        self.assertEqual(self.sizes()["sessions"], 80)
        self.clock.advance(120)  # one prune run after the short sessions expired
        sizes = self.sizes()
        self.assertEqual(sizes["sessions"], 30)
        self.assertEqual(sizes["users"], 30)
        self.assertEqual(sizes["online"], 0)
        self.assertEqual(sizes["per_node"], 0)
        self.assertEqual(sizes["expiry"], 30)
        self.assertEqual(sizes["queues"], 1)
        self.assertEqual(len([why for _, why in self.ended if why == "expired"]), 50)
        self.clock.advance(1000)
        self.assertEqual(set(self.sizes().values()), {0})

    def test_prune_with_mixed_ttls(self) -> None:
        # A long-lived session created first must not hold back shorter ones behind it.
        self.login("long", "a", ttl=1000)
        self.login("short", "b", ttl=10)
        self.clock.advance(10)
        self.assertEqual(self.store.prune_expired(), 1)
        self.assertEqual(self.sizes()["sessions"], 1)

    def test_login_cycles_leave_nothing_behind(self) -> None:
        for i in range(2000):
            record, _ = self.login(f"t{i}", f"user{i % 7}")
            self.result(self.store.mark_online(record))
            self.result(self.store.mark_offline(record))
            self.result(self.store.end_session(token_hash(f"t{i}"), "logged out"))
        self.assertEqual(set(self.sizes().values()), {0})

    def test_stop_without_start(self) -> None:
        self.store.stop()
        self.store.start()
        self.store.start()
        self.store.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
