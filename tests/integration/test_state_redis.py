"""RedisState: the facet contracts against real Redis, plus what only a cluster needs.

Integration tests use the real reactor and Redis at CIM_TEST_REDIS_URL (default
127.0.0.1:6379), each under a key prefix of its own that is deleted afterwards; the
outage tests run a private redis-server they can stop and start. Without Redis they
skip, or fail when CIM_REQUIRE_SERVICES=1.

The unit tests at the end need no Redis: they drive the connection loop with a fake
reactor.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from importlib import resources
from typing import Any, cast

import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cim.backends.state import REASON_MOVED, token_hash
from cim.backends.state.redis import RedisState, scripts
from cim.backends.state.redis.address import parse_redis_url
from cim.backends.state.redis.scripts import Script
from cim.interfaces import AlreadyLoggedIn, IStateBackend, StateUnavailable
from tests.integration.support.services import (
    PrivateRedis,
    eventually,
    redis_available,
    service_missing,
)
from tests.unit.test_state_memory import (
    START,
    TTL,
    Ended,
    ReceiptsContract,
    RoutesContract,
    SequencesContract,
    SessionsContract,
    StateContract,
    listen,
)
from tests.unit.test_state_redis import _note_user

REDIS_URL = os.environ.get("CIM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REPLY_TIMEOUT = 2.0
CONTRACT_ROUTE_TTL = 86400.0
"""Long enough that no route expires by Redis's clock while a contract test runs."""


class RedisFixture(TestCase):
    """Stores on one key prefix of a shared Redis; everything under it goes afterwards."""

    timeout = 60
    url = REDIS_URL

    def setUp(self) -> None:
        address = parse_redis_url(self.url)
        if not redis_available(address.host, address.port):
            service_missing(self, "Redis", f"nothing answers PING at {address}")
        self.address = address
        self.prefix = f"cimtest:{uuid.uuid4().hex}:"
        self.clock = Clock()
        self.clock.advance(START)
        self.addCleanup(self.delete_keys)

    async def make_store(
        self, route_ttl: float = CONTRACT_ROUTE_TTL, url: str | None = None, **options: Any
    ) -> RedisState:
        options.setdefault("clock", self.clock)
        options.setdefault("key_prefix", self.prefix)
        options.setdefault("sweep_interval", 3600.0)
        options.setdefault("max_reconnect_delay", 0.5)
        store = RedisState(
            reactor,
            url or self.url,
            options.pop("reply_timeout", REPLY_TIMEOUT),
            route_ttl,
            **options,
        )
        self.addCleanup(store.stop)
        await store.start()
        return store

    async def redis(self) -> Any:
        connection = await txredisapi.Connection(
            self.address.host, self.address.port, dbid=self.address.db, reconnect=False
        )
        return connection

    async def keys(self) -> list[str]:
        connection = await self.redis()
        try:
            found: list[str] = []
            cursor = 0
            while True:
                cursor, batch = await connection.scan(cursor, self.prefix + "*", 1000)
                found.extend(batch)
                if int(cursor) == 0:
                    return sorted(found)
        finally:
            await connection.disconnect()

    async def delete_keys(self) -> None:
        if not redis_available(self.address.host, self.address.port):
            return
        keys = await self.keys()
        if keys:
            connection = await self.redis()
            try:
                await connection.delete(keys)
            finally:
                await connection.disconnect()

    async def barrier(self, *stores: RedisState) -> None:
        """Wait until every store has received every notification published so far.

        Pub/sub delivers in order, so once a fresh session's end reaches a store, any
        earlier notification (including a duplicate) has reached it too.
        """
        marker = f"barrier-{uuid.uuid4().hex}"
        heard: list[set[str]] = []
        for store in stores:
            seen: set[str] = set()
            heard.append(seen)
            store.sessions.add_session_ended_listener(functools.partial(_note_user, seen))
        await stores[0].sessions.create_session(
            token_hash(marker), marker, "x", "n0", TTL, "kick_old"
        )
        await stores[0].sessions.end_session(token_hash(marker), "logged out")

        async def everyone_heard() -> bool:
            return all(marker in seen for seen in heard)

        await eventually(reactor, everyone_heard, 10, "the barrier notification")


class RedisContractFixture(RedisFixture, StateContract):
    """A started Redis backend on its own key prefix, for the contracts."""

    async def asyncSetUp(self) -> None:
        self.state = await self.make_store()
        self.ended = listen(self.state)

    def setUp(self) -> Any:
        super().setUp()
        return defer.Deferred.fromCoroutine(self.asyncSetUp())

    async def fresh_state(self) -> IStateBackend:
        return await self.make_store()

    async def leftovers(self) -> int:
        # Tombstones of ended sessions and used resumption ticket ids expire by
        # themselves; anything else is a leak.
        return len(
            [key for key in await self.keys() if ":ended:" not in key and ":ticket:" not in key]
        )


class RedisSessionsContractTests(SessionsContract, RedisContractFixture):
    pass


class RedisRoutesContractTests(RoutesContract, RedisContractFixture):
    pass


class RedisReceiptsContractTests(ReceiptsContract, RedisContractFixture):
    pass


class RedisSequencesContractTests(SequencesContract, RedisContractFixture):
    pass


class RedisClusterTests(RedisFixture):
    """Two stores on one prefix are two nodes of a cluster."""

    async def test_node_numbers_differ_between_nodes(self) -> None:
        first = await self.make_store()
        other = await self.make_store()
        one = await first.sequences.node_number("node-a")
        two = await other.sequences.node_number("node-b")
        self.assertNotEqual(one, two)
        self.assertEqual(await other.sequences.node_number("node-a"), one)

    async def nodes(self) -> tuple[RedisState, RedisState, Ended, Ended]:
        n1 = await self.make_store()
        n2 = await self.make_store()
        return n1, n2, listen(n1), listen(n2)

    async def test_concurrent_kick_old_logins_leave_one_session(self) -> None:
        n1, n2, _, _ = await self.nodes()
        attempts = [
            (n1 if i % 2 else n2).sessions.create_session(
                token_hash(f"t{i}"), "alice", "phone", "n1", TTL, "kick_old"
            )
            for i in range(10)
        ]
        results = await defer.gatherResults(attempts)
        live = [await n1.sessions.session_for_token(token_hash(f"t{i}")) for i in range(10)]
        survivors = [record for record in live if record is not None]
        self.assertEqual(len(survivors), 1)
        # Redis ran the logins one after another: each replaced exactly the one before.
        records = [record for record, _ in results]
        previous = [prev for _, prev in results]
        self.assertEqual(previous.count(None), 1)
        replaced = [prev.session_id for prev in previous if prev is not None]
        self.assertEqual(len(set(replaced)), 9)
        self.assertNotIn(survivors[0].session_id, replaced)
        self.assertEqual({r.session_id for r in records}, set(replaced) | {survivors[0].session_id})

    async def test_concurrent_refuse_new_logins_leave_one_session(self) -> None:
        n1, n2, _, _ = await self.nodes()
        d1 = n1.sessions.create_session(token_hash("t1"), "alice", "phone", "n1", TTL, "refuse_new")
        d2 = n2.sessions.create_session(token_hash("t2"), "alice", "pc", "n1", TTL, "refuse_new")
        await defer.gatherResults([d1, d2])
        live = [await n1.sessions.session_for_token(token_hash(t)) for t in ("t1", "t2")]
        self.assertEqual(len([record for record in live if record is not None]), 1)

    async def test_concurrent_logins_against_an_online_session_are_refused(self) -> None:
        n1, n2, _, _ = await self.nodes()
        online, _ = await n1.sessions.create_session(
            token_hash("t0"), "alice", "phone", "n1", TTL, "refuse_new"
        )
        await n1.presence.mark_online(online)
        attempts = [
            (n1 if i % 2 else n2).sessions.create_session(
                token_hash(f"t{i}"), "alice", "pc", "n2", TTL, "refuse_new"
            )
            for i in range(1, 6)
        ]
        outcomes = await defer.DeferredList(attempts, consumeErrors=True)
        for success, result in outcomes:
            self.assertFalse(success)
            self.assertIsInstance(cast(Failure, result).value, AlreadyLoggedIn)
        self.assertEqual(await n2.sessions.session_for_token(token_hash("t0")), online)
        self.assertEqual(await n2.presence.route("alice"), "n1")

    async def test_a_resumption_ticket_is_redeemed_once_across_nodes(self) -> None:
        n1, n2, _, _ = await self.nodes()
        record, _ = await n1.sessions.create_session(
            token_hash("t1"), "alice", "phone", "n1", TTL, "kick_old"
        )
        expires = n1.sessions._core.clock.seconds() + 60  # type: ignore[attr-defined]
        attempts = [
            (n1 if i % 2 else n2).sessions.redeem_ticket("a" * 32, token_hash("t1"), expires)
            for i in range(6)
        ]
        results = await defer.gatherResults(attempts)
        self.assertEqual([r for r in results if r is not None], [record])

    async def test_session_ended_reaches_every_node_once(self) -> None:
        n1, n2, ended1, ended2 = await self.nodes()
        first, _ = await n1.sessions.create_session(
            token_hash("t1"), "alice", "phone", "n2", TTL, "kick_old"
        )
        await n2.presence.mark_online(first)
        second, _ = await n1.sessions.create_session(
            token_hash("t2"), "alice", "phone", "n1", TTL, "kick_old"
        )
        await n2.sessions.end_session(token_hash("t2"), "logged out")
        await self.barrier(n1, n2)
        expected = [(first, "logged in again on this device"), (second, "logged out")]
        self.assertEqual([e for e in ended1 if e[0].user == "alice"], expected)
        self.assertEqual([e for e in ended2 if e[0].user == "alice"], expected)
        self.assertEqual(await n1.presence.route("alice"), None)

    async def test_sweep_ends_expired_sessions_once_across_nodes(self) -> None:
        n1, n2, ended1, ended2 = await self.nodes()
        alice, _ = await n1.sessions.create_session(
            token_hash("ta"), "alice", "phone", "n1", 100, "kick_old"
        )
        await n1.presence.mark_online(alice)
        await n1.sessions.create_session(token_hash("tb"), "bob", "phone", "n1", 1000, "kick_old")
        self.assertEqual(await n2.sweep(), 0)
        self.clock.advance(100)
        self.assertEqual(await n2.sweep(), 1)
        self.assertEqual(await n1.sweep(), 0)
        await self.barrier(n1, n2)
        self.assertEqual([e for e in ended1 if e[0].user == "alice"], [(alice, "expired")])
        self.assertEqual([e for e in ended2 if e[0].user == "alice"], [(alice, "expired")])
        self.assertIsNone(await n1.presence.route("alice"))
        self.assertIsNotNone(await n1.sessions.session_for_token(token_hash("tb")))

    async def test_refresh_rewrites_lost_state(self) -> None:
        n1, n2, ended1, _ = await self.nodes()
        alice, _ = await n1.sessions.create_session(
            token_hash("ta"), "alice", "phone", "n1", TTL, "kick_old"
        )
        bob, _ = await n1.sessions.create_session(
            token_hash("tb"), "bob", "phone", "n2", TTL, "kick_old"
        )
        await n1.presence.mark_online(alice)
        await n2.presence.mark_online(bob)
        await self.delete_keys()  # what a Redis restart without persistence leaves
        self.assertIsNone(await n1.sessions.session_for_token(token_hash("ta")))
        await n1.presence.refresh_sessions("n1", [alice, bob])
        await n2.presence.refresh_sessions("n2", [alice, bob])
        self.assertEqual(await n2.sessions.session_for_token(token_hash("ta")), alice)
        self.assertEqual(await n2.sessions.session_for_token(token_hash("tb")), bob)
        self.assertEqual(await n2.presence.route("alice"), "n1")
        self.assertEqual(await n2.presence.online_count_by_node(), {"n1": 1, "n2": 1})
        self.assertEqual(await n2.presence.online_users(0, 10), (2, ["alice", "bob"]))
        self.assertEqual(ended1, [])
        # The rewritten state is whole: duplicate login and logout work on it.
        await self.assert_refused(n2, "alice")
        _, previous = await n2.sessions.create_session(
            token_hash("tb2"), "bob", "phone", "n1", TTL, "kick_old"
        )
        self.assertEqual(previous, bob)

    async def assert_refused(self, store: RedisState, user: str) -> None:
        try:
            await store.sessions.create_session(
                token_hash("x" + user), user, "pc", "n1", TTL, "refuse_new"
            )
        except AlreadyLoggedIn:
            return
        self.fail("expected AlreadyLoggedIn")

    async def test_a_login_after_lost_state_kicks_the_old_connection_on_refresh(self) -> None:
        n1, n2, ended1, _ = await self.nodes()
        alice, _ = await n1.sessions.create_session(
            token_hash("ta"), "alice", "phone", "n1", TTL, "kick_old"
        )
        await n1.presence.mark_online(alice)
        await self.delete_keys()
        # Redis forgot alice, so this login replaces nothing and no one is told...
        newer, previous = await n2.sessions.create_session(
            token_hash("ta2"), "alice", "phone", "n2", TTL, "kick_old"
        )
        self.assertIsNone(previous)
        # ...until n1's refresh finds a newer session of the device in place of its own.
        await n1.presence.refresh_sessions("n1", [alice])
        self.assertEqual(ended1, [(alice, "logged in again on this device")])
        self.assertEqual(await n1.sessions.session_for_token(token_hash("ta2")), newer)
        self.assertIsNone(await n1.sessions.session_for_token(token_hash("ta")))

    async def test_a_device_left_on_the_old_node_of_a_moved_user_logs_in_again(self) -> None:
        """#15: the ring moved alice to n2 while n1 lives; n1's refresh does not take
        her route back from her devices on n2: its device is told to log in again."""
        n1, n2, ended1, _ = await self.nodes()
        phone, _ = await n1.sessions.create_session(
            token_hash("tp"), "alice", "phone", "n1", TTL, "kick_old", 5
        )
        await n1.presence.mark_online(phone)
        web, _ = await n2.sessions.create_session(
            token_hash("tw"), "alice", "web", "n2", TTL, "kick_old", 5
        )
        await n2.presence.mark_online(web)
        self.assertEqual(await n1.presence.route("alice"), "n2")
        await n1.presence.refresh_sessions("n1", [phone])
        await n2.presence.refresh_sessions("n2", [web])
        self.assertEqual(await n1.presence.route("alice"), "n2")
        self.assertEqual(await n1.presence.online_devices(["alice"]), {"alice": ["web"]})
        self.assertIn((phone, REASON_MOVED), ended1)
        self.assertIsNone(await n1.sessions.session_for_token(token_hash("tp")))
        self.assertEqual(await n1.sessions.session_for_token(token_hash("tw")), web)

    async def test_routes_of_a_silent_node_expire(self) -> None:
        store = await self.make_store(route_ttl=3.0)
        alice, _ = await store.sessions.create_session(
            token_hash("ta"), "alice", "phone", "dead", TTL, "kick_old"
        )
        bob, _ = await store.sessions.create_session(
            token_hash("tb"), "bob", "phone", "live", TTL, "kick_old"
        )
        await store.presence.mark_online(alice)
        await store.presence.mark_online(bob)
        self.assertEqual(await store.presence.online_count_by_node(), {"dead": 1, "live": 1})
        started = time.monotonic()

        async def alice_gone() -> bool:
            # The live node refreshes its users meanwhile; the dead one does not.
            await store.presence.refresh_sessions("live", [bob])
            return await store.presence.route("alice") is None

        await eventually(reactor, alice_gone, 3.0 + 2.0, "alice's route to expire", interval=0.5)
        self.assertGreaterEqual(time.monotonic() - started, 2.0)
        self.assertEqual(await store.presence.route("bob"), "live")
        self.assertEqual(await store.presence.online_count_by_node(), {"live": 1})
        await store.sweep()
        self.assertEqual(await store.presence.online_users(0, 10), (1, ["bob"]))
        # The session itself outlives its route: the user may reconnect elsewhere.
        self.assertEqual(await store.sessions.session_for_token(token_hash("ta")), alice)


class RedisOutageTests(TestCase):
    """A private Redis that goes away and comes back empty, as a restarted one does."""

    timeout = 60

    def setUp(self) -> None:
        self.redis = PrivateRedis(self)
        self.clock = Clock()
        self.clock.advance(START)

    def make_store(self, **options: Any) -> RedisState:
        store = RedisState(
            reactor,
            self.redis.url,
            options.pop("reply_timeout", 1.0),
            options.pop("route_ttl", 60.0),
            clock=self.clock,
            sweep_interval=3600.0,
            max_reconnect_delay=0.5,
            **options,
        )
        self.addCleanup(store.stop)
        return store

    async def assert_fails_fast(self, d: defer.Deferred[Any], within: float) -> None:
        started = time.monotonic()
        try:
            await d
        except StateUnavailable:
            self.assertLess(time.monotonic() - started, within)
            return
        self.fail("expected StateUnavailable")

    async def test_start_fails_when_redis_is_down(self) -> None:
        store = self.make_store(reply_timeout=1.0)
        started = time.monotonic()
        try:
            await store.start()
        except StateUnavailable as exc:
            self.assertIn(str(self.redis.port), str(exc))
        else:
            self.fail("start() succeeded without Redis")
        self.assertLess(time.monotonic() - started, 1.0 + 1.0)
        self.assertFalse(store.connected)
        await self.assert_fails_fast(store.sessions.session_for_token(token_hash("t")), 0.5)

    async def test_outage_fails_fast_then_state_is_rewritten(self) -> None:
        self.redis.start()
        n1, n2 = self.make_store(), self.make_store()
        await n1.start()
        await n2.start()
        ended2 = listen(n2)
        alice, _ = await n1.sessions.create_session(
            token_hash("ta"), "alice", "phone", "n1", TTL, "kick_old"
        )
        bob, _ = await n1.sessions.create_session(
            token_hash("tb"), "bob", "phone", "n1", TTL, "kick_old"
        )
        await n1.presence.mark_online(alice)
        await n1.presence.mark_online(bob)

        self.redis.stop()
        for _ in range(3):
            await self.assert_fails_fast(n1.sessions.session_for_token(token_hash("ta")), 1.0)
            await self.assert_fails_fast(
                n1.sessions.create_session(token_hash("tc"), "carol", "pc", "n1", TTL, "kick_old"),
                1.0,
            )
            await self.assert_fails_fast(n1.presence.refresh_sessions("n1", [alice, bob]), 1.0)
        self.assertFalse(n1.connected)

        self.redis.start()

        async def reconnected() -> bool:
            return n1.connected and n2.connected

        await eventually(reactor, reconnected, 10, "the stores to reconnect by themselves")
        self.assertIsNone(
            await n1.sessions.session_for_token(token_hash("ta"))
        )  # Redis came back empty
        await n1.presence.refresh_sessions("n1", [alice, bob])
        self.assertEqual(await n2.sessions.session_for_token(token_hash("ta")), alice)
        self.assertEqual(await n2.presence.route("bob"), "n1")
        self.assertEqual(await n2.presence.online_count_by_node(), {"n1": 2})
        # Notifications flow again: n2 resubscribed after the restart.
        await n1.sessions.create_session(token_hash("ta2"), "alice", "phone", "n1", TTL, "kick_old")

        async def n2_told() -> bool:
            return (alice, "logged in again on this device") in ended2

        await eventually(reactor, n2_told, 10, "the kick to reach the other node")

    async def test_a_hung_redis_times_out(self) -> None:
        self.redis.start()
        store = self.make_store(reply_timeout=0.5)
        await store.start()
        self.redis.pause()
        await self.assert_fails_fast(store.presence.route("alice"), 0.5 + 0.5)
        self.redis.resume()

        async def answers() -> bool:
            try:
                await store.presence.route("alice")
            except StateUnavailable:
                return False
            return True

        await eventually(reactor, answers, 10, "the store to reconnect after the hang")


class ScriptFilesTests(SynchronousTestCase):
    """The Lua scripts are package files, read once when the backend is imported."""

    def test_every_lua_file_is_a_loaded_script(self) -> None:
        loaded = {
            value.source: name for name, value in vars(scripts).items() if isinstance(value, Script)
        }
        files = sorted(
            entry.name[: -len(".lua")]
            for entry in resources.files("cim.backends.state.redis").iterdir()
            if entry.name.endswith(".lua") and entry.name != "prelude.lua"
        )
        self.assertEqual(len(files), len(loaded))
        for name in files:
            self.assertIn(scripts.load_script(name).source, loaded)

    def test_each_script_has_the_prelude_and_no_placeholder_left(self) -> None:
        for value in vars(scripts).values():
            if isinstance(value, Script):
                self.assertNotIn("$", value.source)
                # Every script begins with the prelude: the prefix and the shared helpers.
                self.assertIn("local p = ARGV[1]", value.source.split("local function")[0])
