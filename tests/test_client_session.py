"""The client library's session: login, fast reconnect, backoff, redirects, kicks."""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from cim.client.router import LoginTicket, NodeTarget, RouterError, parse_ticket
from cim.client.session import Backoff, ChatClient, DeliveryOutcome, SessionFailed
from cim.config import KNOWN_SUITES, SUITE_RC4
from cim.protocols import cim_pb2
from tests.support import NodeHarness


class FakeRouter:
    """Logs users in on a NodeHarness the way the real router would."""

    def __init__(self, node: NodeHarness, suites: tuple[str, ...] = KNOWN_SUITES) -> None:
        self.node = node
        self.suites = suites
        self.logins = 0
        self.logouts: list[str] = []
        self.refuse: RouterError | None = None
        self.down = False

    async def login(self, user: str, password: str, device: str) -> LoginTicket:
        if self.down:
            raise RouterError(0, "unreachable", "cannot reach the router")
        if self.refuse is not None:
            raise self.refuse
        self.logins += 1
        token, record = self.node.login(user, device)
        return LoginTicket(
            token=token,
            session_id=record.session_id,
            user=user,
            node=NodeTarget("node1", "127.0.0.1", 9000),
            server_key=self.node.key.public_der,
            key_fingerprint=self.node.key.fingerprint,
            heartbeat_interval=30.0,
            heartbeat_timeout=90.0,
            cipher_suites=self.suites,
            expires_at=self.node.clock.seconds() + 3600,
        )

    async def logout(self, token: str) -> None:
        self.logouts.append(token)
        await self.node.state.end_session(hashlib.sha256(token.encode()).hexdigest(), "logged out")


class Network:
    """The connector: attaches client protocols to the node unless the node is 'down'."""

    def __init__(self, node: NodeHarness) -> None:
        self.node = node
        self.down = False
        self.attempts: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int, protocol: Any) -> Deferred[Any]:
        self.attempts.append((host, port))
        if self.down:
            return fail(ConnectionRefusedError())
        self.node.attach(protocol)
        return succeed(protocol)


def make_client(
    node: NodeHarness,
    user: str = "alice",
    suite: str | None = None,
    router: FakeRouter | None = None,
) -> tuple[ChatClient, FakeRouter, Network]:
    router = router or FakeRouter(node)
    network = Network(node)
    client = ChatClient(
        node.clock,
        "http://router.invalid",
        user,
        "pw",
        device="phone",
        suite=suite,
        connector=network,
        router=router,  # type: ignore[arg-type]
        backoff=Backoff(initial=1.0, maximum=8.0),
        rng=random.Random(7),
    )
    return client, router, network


def settle(node: NodeHarness, seconds: float = 0.0) -> None:
    """Run what is due now (then after `seconds`), pumping every connection."""
    for step in (0.0, seconds) if seconds else (0.0,):
        node.clock.advance(step)
        for _ in range(10):
            node.clock.advance(0)
            node.flush_all()


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


class ChatClientTests(SynchronousTestCase):
    def test_login_connect_send_and_receive(self) -> None:
        node = NodeHarness()
        alice, _, _ = make_client(node, "alice")
        bob, _, _ = make_client(node, "bob")
        received: list[cim_pb2.Message] = []
        bob.on_message = received.append
        started = [alice.start(), bob.start()]
        settle(node)
        self.assertEqual([result_of(d) for d in started], [None, None])
        self.assertEqual((alice.state, bob.state), ("online", "online"))
        outcome_d = alice.send_text("bob", "hello")
        settle(node)
        outcome = result_of(outcome_d)
        self.assertIsInstance(outcome, DeliveryOutcome)
        self.assertEqual((outcome.status, outcome.to), ("delivered", "bob"))
        self.assertEqual([(getattr(m, "from"), m.text) for m in received], [("alice", "hello")])

    def test_chooses_the_nodes_preferred_suite_or_the_one_asked_for(self) -> None:
        node = NodeHarness()
        router = FakeRouter(node, suites=(SUITE_RC4, "chacha20-poly1305"))
        client, _, _ = make_client(node, router=router)
        client.start()
        settle(node)
        self.assertEqual(client.suite, SUITE_RC4)
        insisting, _, _ = make_client(NodeHarness(), suite="chacha20-poly1305")
        self.assertEqual(insisting.offered, ("chacha20-poly1305",))

    def test_suite_the_node_does_not_allow_is_a_clear_error(self) -> None:
        node = NodeHarness()
        router = FakeRouter(node, suites=(SUITE_RC4,))
        client, _, network = make_client(node, suite="chacha20-poly1305", router=router)
        started = client.start()
        settle(node)
        failure = result_of(started)
        self.assertIsInstance(failure.value, SessionFailed)
        self.assertIn("does not allow cipher suite 'chacha20-poly1305'", str(failure.value))
        self.assertIn(SUITE_RC4, str(failure.value))
        self.assertEqual(network.attempts, [])

    def test_bad_password_stops_without_retrying(self) -> None:
        node = NodeHarness()
        client, router, _ = make_client(node)
        router.refuse = RouterError(401, "invalid_credentials", "wrong user name or password")
        started = client.start()
        settle(node)
        self.assertIsInstance(result_of(started).value, SessionFailed)
        self.assertEqual(client.state, "stopped")
        self.assertEqual(node.clock.getDelayedCalls(), [])

    def test_fast_reconnect_reuses_the_token_without_the_router(self) -> None:
        node = NodeHarness()
        client, router, network = make_client(node)
        client.start()
        settle(node)
        self.assertEqual(router.logins, 1)
        assert client.protocol is not None
        client.protocol.transport.loseConnection()  # the network drops
        settle(node)
        self.assertEqual(client.state, "reconnecting")
        settle(node, 2.0)
        self.assertEqual(client.state, "online")
        self.assertEqual(router.logins, 1)
        self.assertEqual(len(network.attempts), 2)

    def test_falls_back_to_the_router_when_the_cached_login_is_gone(self) -> None:
        node = NodeHarness()
        client, router, _ = make_client(node)
        client.start()
        settle(node)
        assert client.ticket is not None and client.protocol is not None
        # The session ended server-side (e.g. expired): the token is now invalid.
        node.state.end_session(hashlib.sha256(client.ticket.token.encode()).hexdigest(), "expired")
        settle(node)
        settle(node, 2.0)
        self.assertEqual(client.state, "online")
        self.assertEqual(router.logins, 2)

    def test_backoff_grows_with_jitter_while_the_node_is_down(self) -> None:
        node = NodeHarness()
        client, router, network = make_client(node)
        client.start()
        settle(node)
        network.down = True
        router.down = True
        assert client.protocol is not None
        client.protocol.transport.loseConnection()
        settle(node)
        delays = []
        for _ in range(6):
            [call] = node.clock.getDelayedCalls()
            delay = call.getTime() - node.clock.seconds()
            delays.append(delay)
            settle(node, delay)
        # Equal jitter around 1, 2, 4, 8, 8, 8 seconds (capped at 8).
        for delay, step in zip(delays[1:], (2, 4, 8, 8, 8), strict=True):
            self.assertGreaterEqual(delay, step / 2)
            self.assertLessEqual(delay, step)
        network.down = router.down = False
        [call] = node.clock.getDelayedCalls()
        settle(node, call.getTime() - node.clock.seconds())
        self.assertEqual(client.state, "online")

    def test_kicked_session_does_not_reconnect(self) -> None:
        node = NodeHarness()
        first, router, _ = make_client(node)
        states: list[tuple[str, str]] = []
        first.on_state = lambda state, detail: states.append((state, detail))
        first.start()
        settle(node)
        second, _, _ = make_client(node, router=router)
        second.start()
        settle(node)
        self.assertEqual(first.state, "stopped")
        self.assertIn(("stopped", "kicked: logged in elsewhere"), states)
        self.assertEqual(second.state, "online")
        settle(node, 60)
        self.assertEqual(first.state, "stopped")

    def test_connection_loss_fails_pending_messages_explicitly(self) -> None:
        node = NodeHarness()
        alice, _, _ = make_client(node, "alice")
        bob, _, _ = make_client(node, "bob")
        alice.start()
        bob.start()
        settle(node)
        assert bob.protocol is not None
        bob.protocol.send = lambda *args: None  # type: ignore[method-assign]  # bob never acks
        pending = alice.send_text("bob", "are you there?")
        settle(node)
        assert alice.protocol is not None
        alice.protocol.transport.loseConnection()
        settle(node)
        outcome = result_of(pending)
        self.assertEqual(outcome.status, "failed")
        self.assertNotEqual(outcome.msg_id, 0)

    def test_stop_logs_out(self) -> None:
        node = NodeHarness()
        client, router, _ = make_client(node)
        client.start()
        settle(node)
        assert client.ticket is not None
        token = client.ticket.token
        stopped = Deferred.fromCoroutine(client.stop(logout=True))
        settle(node)
        self.assertIsNone(result_of(stopped))
        self.assertEqual(router.logouts, [token])
        self.assertEqual(client.state, "offline")


class TicketTests(SynchronousTestCase):
    def test_key_must_match_its_fingerprint(self) -> None:
        key = secrets.token_bytes(64)
        body = {
            "token": "t",
            "user": "alice",
            "node": {"id": "n", "host": "h", "port": 1},
            "server_key": base64.b64encode(key).decode(),
            "key_fingerprint": hashlib.sha256(key).hexdigest(),
            "heartbeat_interval": 30,
            "heartbeat_timeout": 90,
            "cipher_suites": list(KNOWN_SUITES),
        }
        self.assertEqual(parse_ticket(body).server_key, key)
        body["key_fingerprint"] = hashlib.sha256(b"other").hexdigest()
        with self.assertRaises(RouterError):
            parse_ticket(body)

    def test_repr_hides_the_token(self) -> None:
        ticket = LoginTicket(
            "secret-token", "s", "alice", NodeTarget("n", "h", 1), b"", b"", 30, 90, (), 0
        )
        self.assertNotIn("secret-token", repr(ticket))
