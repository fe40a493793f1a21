"""The state backend's facet contracts every backend keeps, and MemoryState's own promises.

One contract per facet (sessions, routes, receipts, sequences), each a mixin of
coroutine tests; each backend mixes every contract into a TestCase of its own
(tests/integration/test_state_redis.py runs them against real Redis). The facets of
one backend
share their data, so a routes test logs in through the sessions facet and a sessions
test looks at routes. The memory backend runs the contracts synchronously: every
Deferred it returns has already fired, so a contract test that would have to wait
fails here instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cim.backends.state import make_state_store, token_hash
from cim.backends.state.memory import MemoryState
from cim.interfaces import (
    AlreadyLoggedIn,
    IReceiptStore,
    IRouteStore,
    ISequenceStore,
    ISessionStore,
    IStateBackend,
    MessageReceipt,
    SessionRecord,
)
from cim.reactor import ICimReactor

T = TypeVar("T")
TTL = 3600.0
START = 1000.0

Ended = list[tuple[SessionRecord, str]]

if TYPE_CHECKING:
    _ContractBase = SynchronousTestCase
else:
    _ContractBase = object


def listen(state: IStateBackend) -> Ended:
    ended: Ended = []
    state.sessions.add_session_ended_listener(lambda record, why: ended.append((record, why)))
    return ended


class StateContract(_ContractBase):
    """What every facet contract needs. Subclasses set state, clock and ended in setUp.

    ``clock`` is the backend's source of session time (a task.Clock for every backend),
    so expiry is tested by advancing it, never by waiting.
    """

    state: IStateBackend
    clock: Clock
    ended: Ended

    async def fresh_state(self) -> IStateBackend:
        """Another started backend on the same state, with no listeners yet."""
        raise NotImplementedError

    async def leftovers(self) -> int:
        """How many entries the backend still holds (tombstones aside)."""
        raise NotImplementedError

    async def login(
        self,
        token: str,
        user: str,
        policy: str = "kick_old",
        ttl: float = TTL,
        node: str = "n1",
        state: IStateBackend | None = None,
        device: str = "phone",
        max_devices: int = 1,
    ) -> tuple[SessionRecord, SessionRecord | None]:
        target = state if state is not None else self.state
        return await target.sessions.create_session(
            token_hash(token), user, device, node, ttl, policy, max_devices
        )

    async def lookup(self, token: str) -> SessionRecord | None:
        return await self.state.sessions.session_for_token(token_hash(token))

    async def assert_fails(self, d: Deferred[Any], exception: type[BaseException]) -> None:
        try:
            await d
        except exception:
            return
        self.fail(f"expected {exception.__name__}")


class SessionsContract(StateContract):
    """ISessionStore: logins, duplicate-login policies, logouts, expiry, listeners."""

    async def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IStateBackend, self.state))
        self.assertTrue(verifyObject(ISessionStore, self.state.sessions))

    async def test_create_and_lookup(self) -> None:
        record, previous = await self.login("t1", "alice")
        self.assertIsNone(previous)
        self.assertEqual((record.user, record.device, record.node_id), ("alice", "phone", "n1"))
        self.assertEqual(record.created_at, START)
        self.assertEqual(record.expires_at, START + TTL)
        self.assertEqual(record.token_hash, token_hash("t1"))
        self.assertEqual(await self.lookup("t1"), record)
        self.assertIsNone(await self.lookup("other"))

    async def test_lookup_after_expiry_ends_the_session(self) -> None:
        record, _ = await self.login("t1", "alice")
        self.clock.advance(TTL - 1)
        self.assertEqual(await self.lookup("t1"), record)
        self.clock.advance(1)
        self.assertIsNone(await self.lookup("t1"))
        self.assertEqual(self.ended, [(record, "expired")])
        self.assertEqual(await self.leftovers(), 0)

    async def test_kick_old_ends_previous_and_tells_listeners(self) -> None:
        first, _ = await self.login("t1", "alice")
        await self.state.presence.mark_online(first)
        second, previous = await self.login("t2", "alice")
        self.assertEqual(previous, first)
        self.assertNotEqual(second.session_id, first.session_id)
        self.assertEqual(self.ended, [(first, "logged in again on this device")])
        self.assertIsNone(await self.lookup("t1"))
        self.assertEqual(await self.lookup("t2"), second)
        # The kicked session's connection was online; the route is gone with it.
        self.assertIsNone(await self.state.presence.route("alice"))
        self.assertEqual(await self.state.presence.online_count_by_node(), {})

    async def test_end_user_session_by_name(self) -> None:
        record, _ = await self.login("t1", "alice")
        await self.state.presence.mark_online(record)
        await self.login("t2", "bob")
        ended = await self.state.sessions.end_user_sessions("alice", "kicked by an administrator")
        self.assertEqual(ended, [record])
        self.assertEqual(self.ended, [(record, "kicked by an administrator")])
        self.assertIsNone(await self.lookup("t1"))
        self.assertIsNone(await self.state.presence.route("alice"))
        self.assertIsNotNone(await self.lookup("t2"))  # nobody else's session
        self.assertEqual(await self.state.sessions.end_user_sessions("alice", "again"), [])
        self.assertEqual(await self.state.sessions.end_user_sessions("carol", "never"), [])
        self.assertEqual(len(self.ended), 1)

    async def test_end_user_session_after_expiry_is_none(self) -> None:
        record, _ = await self.login("t1", "alice")
        self.clock.advance(TTL)
        self.assertEqual(await self.state.sessions.end_user_sessions("alice", "kicked"), [])
        self.assertEqual(self.ended, [(record, "expired")])

    # --- many devices per user (issue #15) ---------------------------------------------

    async def test_devices_of_one_user_have_a_session_each(self) -> None:
        phone, _ = await self.login("t1", "alice", device="phone", max_devices=3)
        web, previous = await self.login("t2", "alice", device="web", max_devices=3)
        self.assertIsNone(previous)
        for record in (phone, web):
            await self.state.presence.mark_online(record)
        self.assertEqual(await self.lookup("t1"), phone)
        self.assertEqual(await self.lookup("t2"), web)
        self.assertEqual(await self.state.presence.route("alice"), "n1")
        self.assertEqual(await self.state.presence.online_users(0, 10), (1, ["alice"]))
        self.assertEqual(await self.state.presence.online_count_by_node(), {"n1": 1})
        self.assertEqual(
            await self.state.presence.online_devices(["alice", "bob"]),
            {"alice": ["phone", "web"]},
        )
        # One device leaving keeps the user online; the last one takes the route.
        await self.state.presence.mark_offline(phone)
        self.assertEqual(await self.state.presence.route("alice"), "n1")
        self.assertEqual(await self.state.presence.online_devices(["alice"]), {"alice": ["web"]})
        await self.state.presence.mark_offline(web)
        self.assertIsNone(await self.state.presence.route("alice"))
        self.assertEqual(await self.state.presence.online_users(0, 10), (0, []))
        self.assertEqual(self.ended, [])

    async def test_the_same_device_logging_in_again_replaces_only_itself(self) -> None:
        phone, _ = await self.login("t1", "alice", device="phone", max_devices=3)
        web, _ = await self.login("t2", "alice", device="web", max_devices=3)
        await self.state.presence.mark_online(phone)
        again, previous = await self.login("t3", "alice", device="phone", max_devices=3)
        self.assertEqual(previous, phone)
        self.assertEqual(self.ended, [(phone, "logged in again on this device")])
        self.assertEqual(await self.lookup("t2"), web)
        self.assertEqual(await self.lookup("t3"), again)

    async def test_refuse_new_past_the_limit(self) -> None:
        records = []
        for i in range(3):
            record, _ = await self.login(
                f"t{i}", "alice", "refuse_new", device=f"d{i}", max_devices=3
            )
            await self.state.presence.mark_online(record)
            records.append(record)
        await self.assert_fails(
            self.state.sessions.create_session(
                token_hash("t9"), "alice", "d9", "n1", TTL, "refuse_new", 3
            ),
            AlreadyLoggedIn,
        )
        self.assertIsNone(await self.lookup("t9"))
        # A device already counted may always log in again; one going offline makes room.
        await self.login("t5", "alice", "refuse_new", device="d0", max_devices=3)
        await self.state.presence.mark_offline(records[1])
        await self.login("t6", "alice", "refuse_new", device="d9", max_devices=3)
        self.assertIsNone(await self.lookup("t1"))  # the offline one gave way
        self.assertEqual(self.ended[-1], (records[1], "logged in elsewhere"))

    async def test_kick_old_past_the_limit_takes_the_login_and_drops_offline_first(
        self,
    ) -> None:
        old, _ = await self.login("t0", "alice", device="old", max_devices=2)
        self.clock.advance(1)
        online, _ = await self.login("t1", "alice", device="on", max_devices=2)
        await self.state.presence.mark_online(online)
        self.clock.advance(1)
        new, _ = await self.login("t2", "alice", device="new", max_devices=2)
        self.assertEqual(self.ended, [(old, "logged in elsewhere")])
        await self.state.presence.mark_online(new)
        # Both online: the next one is taken too (the node ends the device idle longest).
        newest, _ = await self.login("t3", "alice", device="newest", max_devices=2)
        self.assertEqual(await self.lookup("t1"), online)
        self.assertEqual(await self.lookup("t2"), new)
        self.assertEqual(await self.lookup("t3"), newest)

    async def test_kick_one_device_or_all(self) -> None:
        phone, _ = await self.login("t1", "alice", device="phone", max_devices=3)
        web, _ = await self.login("t2", "alice", device="web", max_devices=3)
        pad, _ = await self.login("t3", "alice", device="pad", max_devices=3)
        ended = await self.state.sessions.end_user_sessions("alice", "kicked", "web")
        self.assertEqual(ended, [web])
        self.assertEqual(await self.lookup("t1"), phone)
        ended = await self.state.sessions.end_user_sessions("alice", "kicked")
        self.assertEqual(ended, [pad, phone])
        self.assertEqual(await self.leftovers(), 0)

    async def test_end_every_device_but_one(self) -> None:
        """A password change: the device that made it stays, every other one ends."""
        phone, _ = await self.login("t1", "alice", device="phone", max_devices=3)
        web, _ = await self.login("t2", "alice", device="web", max_devices=3)
        pad, _ = await self.login("t3", "alice", device="pad", max_devices=3)
        bob, _ = await self.login("t4", "bob", device="phone")
        ended = await self.state.sessions.end_user_sessions(
            "alice", "password changed", keep_device="web"
        )
        self.assertEqual(ended, [pad, phone])
        told = sorted(self.ended[-2:], key=lambda each: each[0].device)  # in any order
        self.assertEqual(told, [(pad, "password changed"), (phone, "password changed")])
        self.assertEqual(await self.lookup("t2"), web)
        self.assertIsNone(await self.lookup("t1"))
        self.assertIsNone(await self.lookup("t3"))
        self.assertEqual(await self.lookup("t4"), bob)
        self.assertEqual(
            await self.state.sessions.end_user_sessions("alice", "again", keep_device="web"), []
        )

    async def test_listener_sees_the_new_session_in_place(self) -> None:
        await self.login("t1", "alice")
        seen: list[Deferred[SessionRecord | None]] = []
        self.state.sessions.add_session_ended_listener(
            lambda record, why: seen.append(self.state.sessions.session_for_token(token_hash("t2")))
        )
        second, _ = await self.login("t2", "alice")
        self.assertEqual(len(seen), 1)
        self.assertEqual(await seen[0], second)

    async def test_refuse_new_refuses_only_while_previous_is_online(self) -> None:
        first, _ = await self.login("t1", "alice", "refuse_new")
        # Not online yet: a second login replaces it.
        second, previous = await self.login("t2", "alice", "refuse_new")
        self.assertEqual(previous, first)
        await self.state.presence.mark_online(second)
        await self.assert_fails(
            self.state.sessions.create_session(
                token_hash("t3"), "alice", "pc", "n1", TTL, "refuse_new"
            ),
            AlreadyLoggedIn,
        )
        self.assertEqual(await self.lookup("t2"), second)
        self.assertIsNone(await self.lookup("t3"))
        await self.state.presence.mark_offline(second)
        third, previous = await self.login("t3", "alice", "refuse_new")
        self.assertEqual(previous, second)
        self.assertEqual(third.user, "alice")

    async def test_refuse_new_ignores_an_expired_online_session(self) -> None:
        first, _ = await self.login("t1", "alice", "refuse_new", ttl=100)
        await self.state.presence.mark_online(first)
        self.clock.advance(100)
        _, previous = await self.login("t2", "alice", "refuse_new")
        self.assertIsNone(previous)
        self.assertEqual(self.ended, [(first, "expired")])

    async def test_unknown_policy_fails(self) -> None:
        await self.assert_fails(
            self.state.sessions.create_session(token_hash("t"), "alice", "pc", "n1", TTL, "nope"),
            ValueError,
        )

    async def test_token_hash_reuse_fails(self) -> None:
        first, _ = await self.login("t1", "alice")
        await self.assert_fails(
            self.state.sessions.create_session(
                token_hash("t1"), "bob", "pc", "n1", TTL, "kick_old"
            ),
            ValueError,
        )
        self.assertEqual(await self.lookup("t1"), first)

    async def test_end_session(self) -> None:
        record, _ = await self.login("t1", "alice")
        await self.state.presence.mark_online(record)
        self.assertEqual(
            await self.state.sessions.end_session(token_hash("t1"), "logged out"), record
        )
        self.assertEqual(self.ended, [(record, "logged out")])
        self.assertIsNone(await self.state.sessions.end_session(token_hash("t1"), "logged out"))
        self.assertIsNone(await self.state.presence.route("alice"))
        self.assertEqual(await self.leftovers(), 0)

    async def test_end_session_of_expired_token_is_unknown(self) -> None:
        record, _ = await self.login("t1", "alice", ttl=10)
        self.clock.advance(10)
        self.assertIsNone(await self.state.sessions.end_session(token_hash("t1"), "logged out"))
        self.assertEqual(self.ended, [(record, "expired")])

    async def test_raising_listener_does_not_break_the_store(self) -> None:
        def broken(record: SessionRecord, why: str) -> None:
            raise RuntimeError("listener bug")

        other = await self.fresh_state()
        after: list[str] = []
        other.sessions.add_session_ended_listener(broken)
        other.sessions.add_session_ended_listener(lambda record, why: after.append(why))
        await self.login("t1", "alice", state=other)
        second, previous = await self.login("t2", "alice", state=other)
        self.assertIsNotNone(previous)
        self.assertEqual(after, ["logged in again on this device"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(await other.sessions.session_for_token(token_hash("t2")), second)

    async def redeem(
        self, ticket_id: str, token: str, expires_at: float = START + 60
    ) -> SessionRecord | None:
        return await self.state.sessions.redeem_ticket(ticket_id, token_hash(token), expires_at)

    async def test_a_ticket_is_redeemed_once(self) -> None:
        record, _ = await self.login("t1", "alice")
        self.assertEqual(await self.redeem("a" * 32, "t1"), record)
        self.assertIsNone(await self.redeem("a" * 32, "t1"))
        self.assertEqual(await self.redeem("b" * 32, "t1"), record)

    async def test_a_ticket_dies_with_its_session(self) -> None:
        await self.login("t1", "alice")
        self.assertIsNone(await self.redeem("a" * 32, "unknown"))
        await self.state.sessions.end_session(token_hash("t1"), "logged out")
        self.assertIsNone(await self.redeem("b" * 32, "t1"))
        record, _ = await self.login("t2", "alice", ttl=10)
        self.clock.advance(10)
        self.assertIsNone(await self.redeem("c" * 32, "t2"))
        self.assertEqual(self.ended[-1], (record, "expired"))

    async def test_an_expired_ticket_is_not_redeemed(self) -> None:
        await self.login("t1", "alice")
        self.clock.advance(60)
        self.assertIsNone(await self.redeem("a" * 32, "t1"))

    async def test_login_cycles_leave_nothing_behind(self) -> None:
        for i in range(50):
            record, _ = await self.login(f"t{i}", f"user{i % 7}")
            await self.state.presence.mark_online(record)
            await self.state.presence.mark_offline(record)
            await self.state.sessions.end_session(token_hash(f"t{i}"), "logged out")
        self.assertEqual(await self.leftovers(), 0)


class RoutesContract(StateContract):
    """IRouteStore: routes, who is online, and the node's refresh."""

    async def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IRouteStore, self.state.presence))

    async def test_routes_of_many_users(self) -> None:
        alice, _ = await self.login("t1", "alice", node="n1")
        bob, _ = await self.login("t2", "bob", node="n2")
        await self.state.presence.mark_online(alice)
        await self.state.presence.mark_online(bob)
        self.assertEqual(
            await self.state.presence.routes(["alice", "bob", "carol"]),
            {"alice": "n1", "bob": "n2"},
        )
        self.assertEqual(await self.state.presence.routes([]), {})

    async def test_mark_offline_of_replaced_session_keeps_new_one_online(self) -> None:
        first, _ = await self.login("t1", "alice")
        await self.state.presence.mark_online(first)
        second, _ = await self.login("t2", "alice", node="n2")
        await self.state.presence.mark_online(second)
        await self.state.presence.mark_offline(first)
        self.assertEqual(await self.state.presence.route("alice"), "n2")
        self.assertEqual(await self.state.presence.online_count_by_node(), {"n2": 1})
        self.assertEqual(await self.state.presence.online_users(0, 10), (1, ["alice"]))

    async def test_mark_online_of_ended_session_is_ignored(self) -> None:
        first, _ = await self.login("t1", "alice")
        await self.login("t2", "alice")
        await self.state.presence.mark_online(first)
        self.assertIsNone(await self.state.presence.route("alice"))
        self.assertEqual(await self.state.presence.online_count_by_node(), {})

    async def test_route_and_counts(self) -> None:
        alice, _ = await self.login("ta", "alice", node="n1")
        bob, _ = await self.login("tb", "bob", node="n2")
        carol, _ = await self.login("tc", "carol", node="n1")
        for record in (alice, bob, carol):
            await self.state.presence.mark_online(record)
        self.assertEqual(await self.state.presence.route("bob"), "n2")
        self.assertIsNone(await self.state.presence.route("dave"))
        self.assertEqual(await self.state.presence.online_count_by_node(), {"n1": 2, "n2": 1})
        await self.state.presence.mark_offline(bob)
        self.assertEqual(await self.state.presence.online_count_by_node(), {"n1": 2})
        self.assertIsNone(await self.state.presence.route("bob"))

    async def test_online_users_paging(self) -> None:
        names = [f"user{i:02d}" for i in range(25)]
        for name in reversed(names):
            record, _ = await self.login("t-" + name, name)
            await self.state.presence.mark_online(record)
        await self.login("t-offline", "zed")
        self.assertEqual(await self.state.presence.online_users(0, 10), (25, names[:10]))
        self.assertEqual(await self.state.presence.online_users(20, 10), (25, names[20:]))
        self.assertEqual(await self.state.presence.online_users(30, 10), (25, []))
        self.assertEqual(await self.state.presence.online_users(0, 0), (25, []))
        await self.assert_fails(self.state.presence.online_users(-1, 10), ValueError)
        await self.assert_fails(self.state.presence.online_users(0, -1), ValueError)

    async def test_refresh_keeps_live_sessions_and_ignores_other_nodes(self) -> None:
        alice, _ = await self.login("ta", "alice", node="n1")
        bob, _ = await self.login("tb", "bob", node="n2")
        for record in (alice, bob):
            await self.state.presence.mark_online(record)
        await self.state.presence.refresh_sessions("n1", [alice, bob])
        self.assertEqual(self.ended, [])
        self.assertEqual(await self.state.presence.route("alice"), "n1")
        self.assertEqual(await self.state.presence.route("bob"), "n2")
        self.assertEqual(await self.state.presence.online_count_by_node(), {"n1": 1, "n2": 1})
        self.assertEqual(await self.lookup("ta"), alice)

    async def test_refresh_puts_back_a_missing_online_entry(self) -> None:
        alice, _ = await self.login("ta", "alice")
        await self.state.presence.refresh_sessions("n1", [alice])
        self.assertEqual(await self.state.presence.route("alice"), "n1")
        self.assertEqual(await self.state.presence.online_users(0, 10), (1, ["alice"]))
        self.assertEqual(await self.state.presence.online_count_by_node(), {"n1": 1})
        await self.state.presence.refresh_sessions("n1", [])

    async def test_refresh_does_not_bring_back_an_ended_session(self) -> None:
        alice, _ = await self.login("ta", "alice")
        await self.state.presence.mark_online(alice)
        await self.state.sessions.end_session(token_hash("ta"), "logged out")
        # A refresh built from the node's list just before the logout arrives after it.
        await self.state.presence.refresh_sessions("n1", [alice])
        self.assertIsNone(await self.lookup("ta"))
        self.assertIsNone(await self.state.presence.route("alice"))
        self.assertEqual(self.ended, [(alice, "logged out")])
        self.assertEqual(await self.leftovers(), 0)

    async def test_refresh_does_not_bring_back_a_replaced_session(self) -> None:
        first, _ = await self.login("t1", "alice", node="n1")
        await self.state.presence.mark_online(first)
        second, _ = await self.login("t2", "alice", node="n2")
        await self.state.presence.refresh_sessions("n1", [first])
        self.assertIsNone(await self.lookup("t1"))
        self.assertEqual(await self.lookup("t2"), second)
        self.assertIsNone(await self.state.presence.route("alice"))
        self.assertEqual(self.ended, [(first, "logged in again on this device")])

    async def test_refresh_ends_an_expired_session_once(self) -> None:
        alice, _ = await self.login("ta", "alice", ttl=100)
        await self.state.presence.mark_online(alice)
        self.clock.advance(100)
        await self.state.presence.refresh_sessions("n1", [alice])
        await self.state.presence.refresh_sessions("n1", [alice])
        self.assertEqual(self.ended, [(alice, "expired")])
        self.assertIsNone(await self.state.presence.route("alice"))
        self.assertEqual(await self.leftovers(), 0)


class ReceiptsContract(StateContract):
    """IReceiptStore: sent-message receipts (dedup of retried msg:R)."""

    async def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IReceiptStore, self.state.receipts))

    async def test_remember_message_claims_once_per_sender_device_sequence(self) -> None:
        self.assertIsNone(await self.state.receipts.remember_message("alice", "phone", 7, 1001, 55))
        again = await self.state.receipts.remember_message("alice", "phone", 7, 2002, 66)
        assert again is not None
        self.assertEqual((again.msg_id, again.sent_at_ms, again.status), (1001, 55, 0))
        # Another device or another sequence is another message.
        self.assertIsNone(
            await self.state.receipts.remember_message("alice", "tablet", 7, 3003, 77)
        )
        self.assertIsNone(await self.state.receipts.remember_message("alice", "phone", 8, 4004, 88))
        # Names cannot be combined into someone else's key.
        self.assertIsNone(
            await self.state.receipts.remember_message("alice:phone", "", 7, 5005, 99)
        )

    async def test_outcome_is_kept_for_retries(self) -> None:
        await self.state.receipts.remember_message("alice", "phone", 1, 1001, 55)
        await self.state.receipts.record_outcome("alice", "phone", 1, 1, "")
        receipt = await self.state.receipts.remember_message("alice", "phone", 1, 9, 9)
        assert receipt is not None
        self.assertEqual((receipt.msg_id, receipt.status), (1001, 1))
        # An outcome for a message never remembered is ignored.
        await self.state.receipts.record_outcome("bob", "phone", 1, 1, "")
        self.assertIsNone(await self.state.receipts.remember_message("bob", "phone", 1, 7, 7))

    async def test_calls_made_together_answer_as_if_made_one_after_the_other(self) -> None:
        """The Redis store sends a turn's claims (and outcomes) as one script call: the
        answers are those of the calls in the order they were made."""
        receipts = self.state.receipts
        first = receipts.remember_message("carol", "phone", 1, 11, 1)
        resend = receipts.remember_message("carol", "phone", 1, 12, 2)
        other = receipts.remember_message("carol", "phone", 2, 13, 3)
        self.assertIsNone(await first)
        again = await resend
        assert again is not None
        self.assertEqual((again.msg_id, again.sent_at_ms, again.status), (11, 1, 0))
        self.assertIsNone(await other)
        delivered = receipts.record_outcome("carol", "phone", 1, 1, "")
        stale = receipts.record_outcome("carol", "phone", 1, 3, "too late")
        failed = receipts.record_outcome("carol", "phone", 2, 3, "no such user")
        nobody = receipts.record_outcome("dave", "phone", 1, 1, "")
        for d in (delivered, stale, failed, nobody):
            await d
        one = await receipts.remember_message("carol", "phone", 1, 99, 9)
        two = await receipts.remember_message("carol", "phone", 2, 99, 9)
        assert one is not None and two is not None
        self.assertEqual((one.msg_id, one.status, one.reason), (11, 1, ""))
        self.assertEqual((two.msg_id, two.status, two.reason), (13, 3, "no such user"))
        self.assertIsNone(await receipts.remember_message("dave", "phone", 1, 7, 7))


class SequencesContract(StateContract):
    """ISequenceStore: node numbers."""

    async def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(ISequenceStore, self.state.sequences))

    async def test_node_numbers_are_stable_and_distinct(self) -> None:
        first = await self.state.sequences.node_number("n1")
        self.assertEqual(await self.state.sequences.node_number("n1"), first)
        self.assertTrue(0 <= first <= 1023)


def run_synchronously(cls: type[T]) -> type[T]:
    """Run each coroutine test of the class without a reactor, as a plain method.

    Fails a test whose coroutine is still waiting when its Deferreds stop firing:
    for the memory backend that would mean it started depending on time or I/O.
    """
    for name in dir(cls):
        if not name.startswith("test_"):
            continue
        method = getattr(cls, name)
        if inspect.iscoroutinefunction(method):
            setattr(cls, name, _synchronous(method))
    return cls


def _synchronous(
    method: Callable[[Any], Coroutine[Deferred[Any], Any, None]],
) -> Callable[[Any], None]:
    @functools.wraps(method)
    def run(self: SynchronousTestCase) -> None:
        outcome: list[object] = []
        Deferred.fromCoroutine(method(self)).addBoth(outcome.append)
        if not outcome:
            self.fail("the test waited on a Deferred that never fired")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()

    return run


class MemoryFixture(StateContract, SynchronousTestCase):
    """A memory backend on a task.Clock, for the contracts."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.memory = MemoryState(self.clock, prune_interval=60)
        self.state = self.memory
        self.ended = listen(self.state)

    async def fresh_state(self) -> IStateBackend:
        return MemoryState(self.clock)

    async def leftovers(self) -> int:
        return sum(sizes(self.memory).values())


@run_synchronously
class MemorySessionsContractTests(SessionsContract, MemoryFixture):
    pass


@run_synchronously
class MemoryRoutesContractTests(RoutesContract, MemoryFixture):
    pass


@run_synchronously
class MemoryReceiptsContractTests(ReceiptsContract, MemoryFixture):
    pass


@run_synchronously
class MemorySequencesContractTests(SequencesContract, MemoryFixture):
    pass


def sizes(state: MemoryState) -> dict[str, int]:
    table = state.table
    return {
        "sessions": len(table.sessions),
        "users": len(table.devices_by_user),
        "online": len(table.online),
        "per_node": len(table.online_per_node),
        "expiry": sum(len(queue) for queue in table.expiry_queues.values()),
        "queues": len(table.expiry_queues),
    }


class MemoryStateTests(SynchronousTestCase):
    """What only the embedded backend promises: bounded memory and its prune."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.state = MemoryState(self.clock, prune_interval=60)
        self.ended = listen(self.state)

    def result(self, d: Deferred[T]) -> T:
        return self.successResultOf(d)

    def login(
        self, token: str, user: str, policy: str = "kick_old", ttl: float = TTL, node: str = "n1"
    ) -> tuple[SessionRecord, SessionRecord | None]:
        return self.result(
            self.state.sessions.create_session(token_hash(token), user, "phone", node, ttl, policy)
        )

    def test_prune_releases_expired_sessions(self) -> None:
        self.state.start()
        self.addCleanup(self.state.stop)
        for i in range(50):
            record, _ = self.login(f"short{i}", f"s{i}", ttl=100)
            self.result(self.state.presence.mark_online(record))
        for i in range(30):
            self.login(f"long{i}", f"l{i}", ttl=1000)
        self.assertEqual(sizes(self.state)["sessions"], 80)
        self.clock.advance(120)  # one prune run after the short sessions expired
        counts = sizes(self.state)
        self.assertEqual(counts["sessions"], 30)
        self.assertEqual(counts["users"], 30)
        self.assertEqual(counts["online"], 0)
        self.assertEqual(counts["per_node"], 0)
        self.assertEqual(counts["expiry"], 30)
        self.assertEqual(counts["queues"], 1)
        self.assertEqual(len([why for _, why in self.ended if why == "expired"]), 50)
        self.clock.advance(1000)
        self.assertEqual(set(sizes(self.state).values()), {0})

    def test_a_one_device_user_costs_no_dict_per_user(self) -> None:
        # Nearly every user has one device: its entries are the record itself, and a
        # second device turns them into dicts, which go back as it leaves.
        sessions, table = self.state.sessions, self.state.table
        phone, _ = self.result(
            sessions.create_session(token_hash("p"), "ann", "phone", "n1", TTL, "kick_old", 3)
        )
        self.result(self.state.presence.mark_online(phone))
        self.assertIs(table.devices_by_user["ann"], phone)
        self.assertIs(table.online["ann"], phone)
        self.clock.advance(1)
        watch, _ = self.result(
            sessions.create_session(token_hash("w"), "ann", "watch", "n1", TTL, "kick_old", 3)
        )
        self.result(self.state.presence.mark_online(watch))
        self.assertEqual(table.devices_by_user["ann"], {"phone": phone, "watch": watch})
        self.assertEqual(table.online["ann"], {"phone": phone, "watch": watch})
        self.assertEqual(
            self.result(self.state.presence.online_devices(["ann"])), {"ann": ["phone", "watch"]}
        )
        self.assertIs(table.newest_online("ann"), watch)
        self.result(self.state.presence.mark_offline(watch))
        self.assertIs(table.online["ann"], phone)
        self.result(sessions.end_session(token_hash("p"), "logged_out"))
        self.assertIs(table.devices_by_user["ann"], watch)
        self.assertNotIn("ann", table.online)
        self.assertEqual(self.result(sessions.end_user_sessions("ann", "logged_out")), [watch])
        self.assertEqual(set(sizes(self.state).values()), {0})

    def test_prune_forgets_receipts_past_the_dedup_window(self) -> None:
        state = MemoryState(self.clock, prune_interval=60, dedup_window=100)
        self.result(state.receipts.remember_message("alice", "phone", 1, 1001, 55))
        self.result(state.receipts.remember_message("bob", "phone", 1, 2001, 57))
        self.clock.advance(50)
        self.result(state.receipts.remember_message("alice", "phone", 2, 1002, 56))
        self.clock.advance(50)
        self.assertEqual(state.prune_expired(), 0)
        receipts: Any = state.receipts
        # bob's only receipt has expired: his device goes; alice's first is skipped.
        self.assertEqual(list(receipts._devices), [("alice", "phone")])
        self.assertEqual(len(receipts), 1)
        self.clock.advance(50)
        state.prune_expired()
        self.assertEqual(len(receipts._devices), 0)

    def test_a_retry_is_recognised_until_its_window_has_passed_exactly(self) -> None:
        receipts = MemoryState(self.clock, dedup_window=100).receipts
        self.result(receipts.remember_message("alice", "phone", 10, 1001, 55))
        self.clock.advance(99.999)
        again = self.result(receipts.remember_message("alice", "phone", 10, 2002, 66))
        self.assertEqual(again, MessageReceipt(1001, 55, 0, ""))
        self.clock.advance(0.001)
        # Past the window the same sequence is a new message (kept for a window again).
        self.assertIsNone(self.result(receipts.remember_message("alice", "phone", 10, 3003, 77)))
        again = self.result(receipts.remember_message("alice", "phone", 10, 4004, 88))
        self.assertEqual(again, MessageReceipt(3003, 77, 0, ""))

    def test_many_receipts_of_one_device_stay_found_as_old_ones_expire(self) -> None:
        store = MemoryState(self.clock, dedup_window=100).receipts
        receipts: Any = store
        for seq in range(1000):
            self.result(store.remember_message("alice", "phone", 5000 + seq, seq, seq))
            self.clock.advance(0.25)  # 250 s in all: the first 601 expire on the way
        packed = receipts._devices[("alice", "phone")]
        self.assertLess(len(packed.seqs), 1000)  # expired ones were cut off, not only skipped
        self.assertEqual(len(packed.data), 3 * len(packed.seqs))
        self.assertEqual(len(store), 400)  # as of the last one: 600 expired at 250 s
        for seq in (601, 777, 999):
            receipt = self.result(store.remember_message("alice", "phone", 5000 + seq, -1, -1))
            self.assertEqual(receipt, MessageReceipt(seq, seq, 0, ""))
        # An expired sequence is a new message, and its outcome is not kept.
        self.result(store.record_outcome("alice", "phone", 5600, 1, ""))
        self.assertIsNone(self.result(store.remember_message("alice", "phone", 5600, 1, 1)))

    def test_a_device_numbering_from_lower_again_is_still_deduplicated(self) -> None:
        store = MemoryState(self.clock, dedup_window=100).receipts
        for seq in (100, 101, 102):
            self.result(store.remember_message("alice", "phone", seq, seq, seq))
        # Reinstalled: it starts again from 1, interleaved with retries of the old ones.
        self.assertIsNone(self.result(store.remember_message("alice", "phone", 1, 901, 9)))
        self.assertEqual(
            self.result(store.remember_message("alice", "phone", 101, 0, 0)),
            MessageReceipt(101, 101, 0, ""),
        )
        self.assertIsNone(self.result(store.remember_message("alice", "phone", 2, 902, 9)))
        self.assertEqual(
            self.result(store.remember_message("alice", "phone", 1, 0, 0)),
            MessageReceipt(901, 9, 0, ""),
        )
        self.clock.advance(100)
        receipts: Any = store
        store.forget_expired()
        self.assertEqual(len(receipts._devices), 0)
        # Once they have all expired the device's receipts are bisected again.
        self.assertIsNone(self.result(store.remember_message("alice", "phone", 3, 903, 9)))
        self.assertTrue(receipts._devices[("alice", "phone")].ordered)

    def test_outcomes_with_reasons_and_stale_failures(self) -> None:
        store = MemoryState(self.clock, dedup_window=100).receipts
        self.result(store.remember_message("alice", "phone", 1, 1001, 55))
        self.result(store.remember_message("alice", "phone", 2, 1002, 56))
        self.result(store.record_outcome("alice", "phone", 1, 2, ""))
        self.result(store.record_outcome("alice", "phone", 1, 3, "too late"))
        self.result(store.record_outcome("alice", "phone", 2, 3, "blocked"))
        self.assertEqual(
            self.result(store.remember_message("alice", "phone", 1, 0, 0)),
            MessageReceipt(1001, 55, 2, ""),
        )
        self.assertEqual(
            self.result(store.remember_message("alice", "phone", 2, 0, 0)),
            MessageReceipt(1002, 56, 3, "blocked"),
        )
        # A resend after a failure that is then delivered drops the reason.
        self.result(store.record_outcome("alice", "phone", 2, 1, ""))
        self.assertEqual(
            self.result(store.remember_message("alice", "phone", 2, 0, 0)),
            MessageReceipt(1002, 56, 1, ""),
        )

    def test_prune_with_mixed_ttls(self) -> None:
        # A long-lived session created first must not hold back shorter ones behind it.
        self.login("long", "a", ttl=1000)
        self.login("short", "b", ttl=10)
        self.clock.advance(10)
        self.assertEqual(self.state.prune_expired(), 1)
        self.assertEqual(sizes(self.state)["sessions"], 1)

    def test_login_cycles_leave_nothing_behind(self) -> None:
        for i in range(2000):
            record, _ = self.login(f"t{i}", f"user{i % 7}")
            self.result(self.state.presence.mark_online(record))
            self.result(self.state.presence.mark_offline(record))
            self.result(self.state.sessions.end_session(token_hash(f"t{i}"), "logged out"))
        self.assertEqual(set(sizes(self.state).values()), {0})

    def test_stop_without_start(self) -> None:
        self.state.stop()
        self.state.start()
        self.state.start()
        self.state.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refresh_of_a_record_without_token_hash(self) -> None:
        # Records built before token_hash existed still find their session by user.
        record, _ = self.login("t1", "alice")
        bare = SessionRecord(
            record.session_id,
            record.user,
            record.device,
            record.node_id,
            record.created_at,
            record.expires_at,
        )
        self.result(self.state.presence.refresh_sessions("n1", [bare]))
        self.assertEqual(self.result(self.state.presence.route("alice")), "n1")


class MakeStateStoreTests(SynchronousTestCase):
    def test_memory_is_the_default(self) -> None:
        from cim.config import StateConfig

        state = make_state_store(StateConfig(), cast(ICimReactor, MemoryReactorClock()))
        self.assertIsInstance(state, MemoryState)
        self.assertTrue(verifyObject(IStateBackend, state))
