"""RedisStateStore without Redis: the address, the connection loop on a fake reactor.

The contract and the cluster tests against real Redis are in
tests/integration/test_state_redis.py.
"""

from __future__ import annotations

from typing import Any, cast

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IConnector
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cim.backends.backoff import Backoff
from cim.backends.state import make_state_store, token_hash
from cim.backends.state.redis import RedisState
from cim.backends.state.redis.address import RedisAddress, parse_redis_url
from cim.backends.state.redis.connection import (
    LAST_CHANCE,
    RedisConnection,
    _CommandProtocol,
    _link,
    _ping,
    _RedisFactory,
)
from cim.backends.state.redis.routes import RedisRouteStore
from cim.config import StateConfig
from cim.interfaces import IStateBackend, SessionRecord, StateUnavailable
from tests.unit.test_state_memory import START, TTL

# --- unit tests: no Redis ------------------------------------------------------------


class RedisAddressTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(
            parse_redis_url("redis://10.0.0.5:6380/2"), RedisAddress("10.0.0.5", 6380, db=2)
        )
        self.assertEqual(parse_redis_url("redis://localhost"), RedisAddress("localhost", 6379))
        self.assertEqual(
            parse_redis_url("unix:///run/redis.sock?db=3"),
            RedisAddress(unix_path="/run/redis.sock", db=3),
        )
        address = parse_redis_url("redis://cim:s3cr%40t@redis.example:6379/0")
        self.assertEqual((address.username, address.password), ("cim", "s3cr@t"))

    def test_password_never_shown(self) -> None:
        address = parse_redis_url("redis://:hunter2@127.0.0.1:6379/1")
        self.assertEqual(address.password, "hunter2")
        self.assertNotIn("hunter2", str(address))
        self.assertNotIn("hunter2", repr(address))
        with self.assertRaises(ValueError) as caught:
            parse_redis_url("redis://:hunter2@127.0.0.1:notaport/1")
        self.assertNotIn("hunter2", str(caught.exception))

    def test_bad_urls(self) -> None:
        for url in ("http://127.0.0.1", "redis://127.0.0.1/x", "unix://"):
            self.assertRaises(ValueError, parse_redis_url, url)


class RedisConnectionLoopTests(SynchronousTestCase):
    """The reconnect loop and fail-fast calls, on a fake reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.state = RedisState(
            self.reactor,
            "redis://127.0.0.1:6390/0",
            5.0,
            60.0,
            reconnect_delay=0.2,
            max_reconnect_delay=5.0,
        )

    def refuse_pending(self) -> int:
        """Refuse every connection attempt in flight; how many there were."""
        refused = 0
        connector = cast(IConnector, None)  # the endpoint's factory never looks at it
        while self.reactor.tcpClients:
            _, _, factory, _, _ = self.reactor.tcpClients.pop()
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            refused += 1
        return refused

    def warnings(self) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_namespace") == "cim.state.redis"]

    def test_calls_fail_at_once_before_start(self) -> None:
        failure = self.failureResultOf(
            self.state.sessions.session_for_token(token_hash("t")), StateUnavailable
        )
        self.assertIn("not connected", str(failure.value))
        self.failureResultOf(self.state.presence.route("alice"), StateUnavailable)
        self.failureResultOf(
            self.state.presence.refresh_sessions("n1", [record()]), StateUnavailable
        )
        # Nothing was queued to be sent later.
        self.assertEqual(self.reactor.tcpClients, [])

    def test_start_fails_after_the_timeout(self) -> None:
        started = self.state.start()
        self.assertEqual(len(self.reactor.tcpClients), 2)  # commands and notifications
        self.assertNoResult(started)
        self.reactor.advance(4.9)
        self.assertNoResult(started)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(started, StateUnavailable)
        self.assertIn("127.0.0.1:6390", str(failure.value))
        # It gave up for good: no retry is left scheduled.
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reconnects_forever_with_capped_backoff_and_logs_once(self) -> None:
        address = parse_redis_url("redis://127.0.0.1:6390/0")
        link = _link(
            "command",
            self.reactor,
            address.endpoint(self.reactor, 5.0),
            _RedisFactory(_CommandProtocol, self.reactor, address, 5.0),
            str(address),
            _ping,
            Backoff(0.2, 5.0, jitter=0.2),
        )
        link.start()
        delays: list[float] = []
        for _ in range(40):
            self.assertEqual(self.refuse_pending(), 1)
            [retry] = self.reactor.getDelayedCalls()
            delays.append(retry.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        self.assertEqual(len(self.reactor.tcpClients), 1)  # still trying after 40 failures
        self.assertLessEqual(max(delays), 5.0)
        self.assertGreater(max(delays), 3.0)  # it backed off up to the cap
        self.assertLess(delays[0], 0.25)
        self.assertEqual(len(self.warnings()), 1)  # one line, however many attempts failed
        self.successResultOf(link.stop())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_calls_fail_at_once_while_reconnecting(self) -> None:
        started = self.state.start()
        self.refuse_pending()
        self.failureResultOf(self.state.presence.route("alice"), StateUnavailable)
        self.failureResultOf(
            self.state.sessions.create_session(
                token_hash("t"), "alice", "pc", "n1", TTL, "kick_old"
            ),
            StateUnavailable,
        )
        self.reactor.advance(5)
        self.failureResultOf(started, StateUnavailable)


class MakeRedisStoreTests(SynchronousTestCase):
    def test_redis_backend(self) -> None:
        config = StateConfig(backend="redis", redis_url="redis://127.0.0.1:6390/0")
        state = make_state_store(config, MemoryReactorClock())
        self.assertIsInstance(state, RedisState)
        self.assertTrue(verifyObject(IStateBackend, state))


def _note_user(seen: set[str], record: SessionRecord, why: str) -> None:
    seen.add(record.user)


def record() -> SessionRecord:
    return SessionRecord("s", "alice", "pc", "n1", START, START + TTL, token_hash("t"))


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class _Protocol:
    def __init__(self) -> None:
        self.transport = _Transport()


class ReplyTimeoutTests(SynchronousTestCase):
    """The reply timeout gives a node that fell behind one more pass over its sockets."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.connection = RedisConnection(
            self.reactor,
            RedisAddress("127.0.0.1", 6390),
            5.0,
            ["cim:session-ended", "cim:route-changed"],
            lambda channel, message: None,
            0.2,
            5.0,
        )
        self.protocol = _Protocol()
        self.reply: Deferred[Any] = Deferred()
        self.answer = self.connection._timed(self.protocol, self.reply)

    def test_a_reply_read_in_the_pass_after_the_deadline_counts(self) -> None:
        # One turn took longer than the timeout: the timer runs before the socket is
        # read, the reply is read in the I/O pass that follows.
        self.reactor.advance(6.0)
        self.assertNoResult(self.answer)
        self.reply.callback("PONG")
        self.reactor.advance(LAST_CHANCE)
        self.assertEqual(self.successResultOf(self.answer), "PONG")
        self.assertFalse(self.protocol.transport.aborted)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_reply_after_that_pass_is_a_timeout_that_drops_the_connection(self) -> None:
        self.reactor.advance(5.0)
        self.assertNoResult(self.answer)
        self.reactor.advance(LAST_CHANCE)
        self.failureResultOf(self.answer, txredisapi.TimeoutError)
        self.assertTrue(self.protocol.transport.aborted)
        # The reply (or the lost connection's error) that comes later changes nothing.
        self.reply.errback(txredisapi.ConnectionError("lost"))

    def test_a_reply_in_time_cancels_the_timer(self) -> None:
        self.reply.callback(["ok"])
        self.assertEqual(self.successResultOf(self.answer), ["ok"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_an_error_reply_is_passed_on(self) -> None:
        self.reply.errback(txredisapi.ResponseError("NOSCRIPT"))
        self.failureResultOf(self.answer, txredisapi.ResponseError)
        self.assertFalse(self.protocol.transport.aborted)


class CommandEncodingTests(SynchronousTestCase):
    """The command protocol's own encoder writes what txredisapi's writes."""

    def test_the_same_bytes_as_txredisapi_for_every_kind_of_argument(self) -> None:
        ours, theirs = _CommandProtocol(), txredisapi.RedisProtocol()
        cases: list[tuple[Any, ...]] = [
            ("PING",),
            ("EVALSHA", "a" * 40, 0, "alice", "phone", 1_700_000_000_123, -5),
            ("SET", "k\u00fcr", b"\x00\xff raw", 2.5, True, bytearray(b"ba")),
            ("GET", ""),
        ]
        for args in cases:
            self.assertEqual(ours._build_command(*args), theirs._build_command(*args))
        self.assertEqual(
            ours._build_command("EVALSHA", "s", 0, "u"),
            b"*4\r\n$7\r\nEVALSHA\r\n$1\r\ns\r\n$1\r\n0\r\n$1\r\nu\r\n",
        )

    def test_without_a_charset_a_string_goes_txredisapis_way(self) -> None:
        ours, theirs = _CommandProtocol(charset=None), txredisapi.RedisProtocol(charset=None)
        self.assertEqual(ours._build_command("GET", "k"), theirs._build_command("GET", "k"))


class _FakeCore:
    """Just enough of RedisCore for the route store: commands wait for the test."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.prefix = "cim:"
        self.sent: list[tuple[tuple[Any, ...], Deferred[Any]]] = []
        self.connection = type("Connection", (), {"notified": True})()
        self.listeners: list[Any] = []

    def add_route_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def command(self, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.sent.append((args, d))
        return d


class SharedRouteReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.core = _FakeCore()
        self.routes = RedisRouteStore(cast(Any, self.core))

    def test_lookups_while_a_read_is_on_its_way_share_it(self) -> None:
        first, second = self.routes.route("bob"), self.routes.route("bob")
        other = self.routes.route("carol")
        self.assertEqual(
            [args for args, _ in self.core.sent],
            [("HGET", "cim:route:bob", "node"), ("HGET", "cim:route:carol", "node")],
        )
        self.core.sent[0][1].callback(None)  # bob is not online
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (None, None))
        self.assertNoResult(other)
        # "Not online" is not kept: the next lookup reads again.
        self.routes.route("bob")
        self.assertEqual(len(self.core.sent), 3)

    def test_a_failed_read_fails_everyone_who_shared_it(self) -> None:
        first, second = self.routes.route("bob"), self.routes.route("bob")
        self.core.sent[0][1].errback(StateUnavailable("redis is down"))
        self.failureResultOf(first, StateUnavailable)
        self.failureResultOf(second, StateUnavailable)
        self.routes.route("bob")
        self.assertEqual(len(self.core.sent), 2)  # nothing left waiting on the failed one
