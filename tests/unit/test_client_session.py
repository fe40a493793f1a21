"""The client library's session: login, fast reconnect, backoff, redirects, kicks, and
reliable delivery end to end (retries, outcomes) against a NodeHarness; receiving (dedup,
seq order, acks) against a TimelineNode that speaks the timelines' wire."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import secrets
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.client.acks import GROUP_ACK_DELAY
from cim.client.router import LoginTicket, NodeTarget, RouterError, parse_ticket
from cim.client.session import Backoff, ChatClient, DeliveryOutcome, SessionFailed
from cim.config import KNOWN_SUITES, SUITE_RC4
from cim.protocols import cim_pb2
from tests.fakes.node import NodeHarness
from tests.fakes.timeline_node import TimelineNode, session


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
        await self.node.state.sessions.end_session(
            hashlib.sha256(token.encode()).hexdigest(), "logged out"
        )


class Network:
    """The connector: attaches client protocols to the node unless the node is 'down'."""

    def __init__(self, node: NodeHarness) -> None:
        self.node = node
        self.down = False
        self.attempts: list[tuple[str, int]] = []
        # Every frame the client sent on any of its connections: (time, type, message).
        self.sent: list[tuple[float, int, Any]] = []

    def __call__(self, host: str, port: int, protocol: Any) -> Deferred[Any]:
        self.attempts.append((host, port))
        if self.down:
            return fail(ConnectionRefusedError())
        original = protocol.send

        def send(frame_type: int, message: Any) -> None:
            self.sent.append((self.node.clock.seconds(), frame_type, message))
            original(frame_type, message)

        protocol.send = send
        self.node.attach(protocol)
        return succeed(protocol)


def make_client(
    node: NodeHarness,
    user: str = "alice",
    suite: str | None = None,
    router: FakeRouter | None = None,
    device: str = "phone",
    **options: Any,
) -> tuple[ChatClient, FakeRouter, Network]:
    router = router or FakeRouter(node)
    network = Network(node)
    client = ChatClient(
        node.clock,
        "http://router.invalid",
        user,
        "pw",
        device=device,
        suite=suite,
        connector=network,
        router=router,  # type: ignore[arg-type]
        backoff=Backoff(initial=1.0, maximum=8.0),
        rng=random.Random(7),
        **options,
    )
    return client, router, network


def settle(node: NodeHarness, seconds: float = 0.0) -> None:
    """Run what is due now (then after `seconds`), pumping every connection."""
    for step in (0.0, seconds) if seconds else (0.0,):
        node.clock.advance(step)
        for _ in range(10):
            node.clock.advance(0)
            node.flush_all()


def run_for(node: NodeHarness, seconds: float, step: float = 1.0) -> None:
    """Let time pass in steps, so heartbeats keep the connections alive on the way."""
    for _ in range(round(seconds / step)):
        settle(node, step)


def drop(client: ChatClient) -> None:
    """The network cuts the client's connection."""
    assert client.protocol is not None and client.protocol.transport is not None
    client.protocol.transport.loseConnection()


def record_sends(client: ChatClient, swallow: bool = False) -> list[tuple[float, int, Any]]:
    """Everything the client's current connection sends from now on, with the time."""
    protocol = client.protocol
    assert protocol is not None
    sent: list[tuple[float, int, Any]] = []
    original = protocol.send

    def send(frame_type: int, message: Any) -> None:
        sent.append((protocol.clock.seconds(), frame_type, message))
        if not swallow:
            original(frame_type, message)

    protocol.send = send  # type: ignore[method-assign]
    return sent


def of_type(sent: list[tuple[float, int, Any]], frame_type: int) -> list[tuple[float, Any]]:
    return [(when, message) for when, kind, message in sent if kind == frame_type]


def incoming(
    msg_id: int, seq: int, sender: str = "alice", device: str = "phone", group: str = ""
) -> cim_pb2.Message:
    message = cim_pb2.Message(id=msg_id, text=f"{sender}/{seq}", client_seq=seq, device=device)
    setattr(message, "from", sender)
    if group:
        message.group = group
    else:
        message.to = "bob"
    return message


def result_of(d: Deferred[Any]) -> Any:
    """What the Deferred fired with; a result stays in place, a failure is consumed."""
    results: list[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return None if isinstance(result, Failure) else result

    d.addBoth(keep)
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
        drop(client)
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
        node.state.sessions.end_session(
            hashlib.sha256(client.ticket.token.encode()).hexdigest(), "expired"
        )
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
        drop(client)
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
        """The same device logging in again ends its older session for good."""
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
        self.assertIn(("stopped", "kicked: logged in again on this device"), states)
        self.assertEqual(second.state, "online")
        settle(node, 60)
        self.assertEqual(first.state, "stopped")

    def test_connection_loss_fails_pending_messages_explicitly_in_manual(self) -> None:
        node = NodeHarness()
        alice, _, _ = make_client(node, "alice", retry="manual")
        bob, _, _ = make_client(node, "bob")
        alice.start()
        bob.start()
        settle(node)
        assert bob.protocol is not None
        bob.protocol.send = lambda *args: None  # type: ignore[method-assign]  # bob never acks
        pending = alice.send_text("bob", "are you there?")
        settle(node)
        drop(alice)
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


class SenderRetryTests(SynchronousTestCase):
    """The outbox wired to a real node: what goes on the wire, when, and how it ends."""

    def online_pair(self, **options: Any) -> tuple[NodeHarness, ChatClient, Any, Network]:
        """Alice (a ChatClient) and bob (a bare connection that never acknowledges)."""
        node = NodeHarness()
        alice, _, network = make_client(node, "alice", **options)
        alice.start()
        bob = node.connect("bob")
        settle(node)
        self.assertEqual(alice.state, "online")
        return node, alice, bob, network

    def test_auto_resends_after_10_30_60_seconds_then_reports_failure(self) -> None:
        node, alice, bob, network = self.online_pair()
        outcomes: list[DeliveryOutcome] = []
        alice.on_outcome = outcomes.append
        start = node.clock.seconds()
        pending = alice.send_text("bob", "anyone?")
        run_for(node, 159)
        msg_r = of_type(network.sent, cim_pb2.MSG_R)
        self.assertEqual([when - start for when, _ in msg_r], [0, 10, 40, 100])
        self.assertEqual(len({message.client_seq for _, message in msg_r}), 1)
        self.assertEqual(outcomes, [])
        self.assertEqual(alice.state, "online")  # heartbeats kept everyone connected
        run_for(node, 1)
        [outcome] = outcomes
        self.assertEqual(outcome.status, "failed")
        self.assertEqual(outcome.reason, "no ack:N within 160 s (4 sends)")
        self.assertEqual(result_of(pending), outcome)
        seqs = {message.client_seq for message in bob.events.of_type(cim_pb2.MSG_N)}
        self.assertEqual(seqs, {outcome.client_seq})

    def test_auto_resends_everything_waiting_at_once_after_a_reconnect(self) -> None:
        node, alice, bob, network = self.online_pair()
        outcomes: list[DeliveryOutcome] = []
        alice.on_outcome = outcomes.append
        first = alice.send_text("bob", "one")
        settle(node)
        drop(alice)
        settle(node)
        self.assertEqual(alice.state, "reconnecting")
        second = alice.send_text("bob", "two")  # kept for the next connection
        before = len(network.sent)
        settle(node, 1.0)
        self.assertEqual((alice.state, len(network.attempts)), ("online", 2))
        resent = [m.client_seq for _, m in of_type(network.sent[before:], cim_pb2.MSG_R)]
        one = of_type(network.sent, cim_pb2.MSG_R)[0][1].client_seq
        self.assertEqual(resent, [one, one + 1])
        for message in bob.events.of_type(cim_pb2.MSG_N):
            bob.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=message.id))
        settle(node)
        self.assertEqual(
            [(o.client_seq, o.status) for o in outcomes],
            [(one, "delivered"), (one + 1, "delivered")],
        )
        self.assertEqual(result_of(first), outcomes[0])
        self.assertEqual(result_of(second), outcomes[1])
        self.assertEqual(len(alice.outbox), 0)

    def test_manual_reports_after_the_first_wait_and_resend_delivers(self) -> None:
        node, alice, bob, network = self.online_pair(retry="manual")
        outcomes: list[DeliveryOutcome] = []
        alice.on_outcome = outcomes.append
        first = alice.send_text("bob", "hello?")
        run_for(node, 10)
        [failed] = outcomes
        self.assertEqual((failed.status, failed.reason), ("failed", "no ack:N within 10 s"))
        self.assertEqual(result_of(first), failed)
        again = alice.resend(failed.client_seq)
        settle(node)
        resent = of_type(network.sent, cim_pb2.MSG_R)
        self.assertEqual([m.client_seq for _, m in resent], [failed.client_seq] * 2)
        for message in bob.events.of_type(cim_pb2.MSG_N):  # bob finally answers
            bob.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=message.id))
        settle(node)
        self.assertEqual(result_of(again).status, "delivered")
        self.assertEqual(result_of(again).client_seq, failed.client_seq)
        self.assertEqual([o.status for o in outcomes], ["failed", "delivered"])
        self.assertRaises(KeyError, alice.resend, failed.client_seq)

    def test_manual_fails_at_once_without_a_connection(self) -> None:
        node, alice, _, _ = self.online_pair(retry="manual")
        drop(alice)
        settle(node)
        outcome = result_of(alice.send_text("bob", "now?"))
        self.assertEqual((outcome.status, outcome.reason), ("failed", "not connected"))

    def test_nothing_is_queued_before_start_or_after_stop(self) -> None:
        node = NodeHarness()
        alice, _, _ = make_client(node, "alice")
        outcome = result_of(alice.send_text("bob", "early"))
        self.assertEqual((outcome.status, outcome.reason), ("failed", "not connected (offline)"))

    def test_stop_reports_what_is_still_waiting(self) -> None:
        node, alice, _, _ = self.online_pair()
        pending = alice.send_text("bob", "bye")
        settle(node)
        Deferred.fromCoroutine(alice.stop(logout=False))
        settle(node)
        outcome = result_of(pending)
        self.assertEqual(
            (outcome.status, outcome.reason), ("failed", "the client stopped before an answer came")
        )
        self.assertNotEqual(outcome.msg_id, 0)

    def test_each_message_is_reported_exactly_once_whatever_the_node_repeats(self) -> None:
        # The node is faked at the connection: its answers to a retried msg:R
        # (the same msg:A, the ack:N again) are what the node-side dedup sends.
        node, alice, _, _ = self.online_pair()
        outcomes: list[DeliveryOutcome] = []
        alice.on_outcome = outcomes.append
        sent = record_sends(alice, swallow=True)
        pending = alice.send_text("bob", "once")
        group = alice.send_message(cim_pb2.Message(group="g1", text="to all"))
        run_for(node, 10)
        seq = of_type(sent, cim_pb2.MSG_R)[0][1].client_seq
        self.assertEqual(
            [m.client_seq for _, m in of_type(sent, cim_pb2.MSG_R)], [seq, seq + 1] * 2
        )
        for _ in range(2):
            alice.frame_received(cim_pb2.MSG_A, cim_pb2.MsgA(client_seq=seq, msg_id=77))
        for _ in range(2):
            alice.frame_received(
                cim_pb2.ACK_N,
                cim_pb2.AckN(msg_id=77, client_seq=seq, status=cim_pb2.DELIVERED, to="bob"),
            )
        alice.frame_received(
            cim_pb2.ACK_N, cim_pb2.AckN(msg_id=78, client_seq=seq + 1, status=cim_pb2.ACCEPTED)
        )
        drop(alice)
        run_for(node, 200)
        self.assertEqual(
            [(o.client_seq, o.msg_id, o.to, o.status) for o in outcomes],
            [(seq, 77, "bob", "delivered"), (seq + 1, 78, "g1", "accepted")],
        )
        self.assertEqual(result_of(pending), outcomes[0])
        self.assertEqual(result_of(group), outcomes[1])
        self.assertEqual(len(of_type(sent, cim_pb2.MSG_R)), 4)  # nothing after the answers


class ReceiverTests(SynchronousTestCase):
    """The inbox wired to a session: dedup, acks, seq order, across restarts."""

    def online_bob(
        self, node: TimelineNode | None = None, **options: Any
    ) -> tuple[TimelineNode, ChatClient, list[cim_pb2.Message]]:
        node = node or TimelineNode("bob")
        bob, _, shown = session(node, **options)
        node.connect(bob)
        node.pump()
        return node, bob, shown

    def test_duplicates_are_dropped_and_still_acknowledged(self) -> None:
        node, _bob, shown = self.online_bob()
        first = node.append("alice", "hello", peer="bob")
        node.live(first)
        node.live(first)  # redelivered by the node
        retry = cim_pb2.Message()
        retry.CopyFrom(first)
        retry.id = first.id + 1  # a retry with a new server id, in the same place
        node.live(retry)
        self.assertEqual([m.id for m in shown], [first.id])
        acks = [(m.msg_id, m.through_seq) for m in node.of_type(cim_pb2.ACK_R)]
        self.assertEqual(acks, [(first.id, 1), (first.id, 1), (retry.id, 1)])

    def test_dedup_survives_a_new_client_with_the_same_seen_path(self) -> None:
        path = os.path.join(self.mktemp(), "bob-seen.jsonl")
        node = TimelineNode("bob")
        node.swallow = {cim_pb2.ACK_R}  # the cursor never moves: all comes again
        node, first, shown = self.online_bob(node, seen_path=path)
        one = node.append("alice", "one", peer="bob")
        group = node.append("carol", "in the group", group="g")
        node.live(one)
        node.live(group)  # a group new since the summary: it waits for its pull
        node.pump()
        self.assertEqual([m.id for m in shown], [one.id, group.id])
        self.successResultOf(Deferred.fromCoroutine(first.stop()))
        node.swallow = set()
        _, _second, shown_again = self.online_bob(node, seen_path=path)
        self.assertEqual(shown_again, [], "the catch-up brought them again: known ids")
        self.assertEqual(node.cursors, {"d:alice:bob": 1, "g:g": 1})
        two = node.append("alice", "two", peer="bob")
        node.live(two)
        self.assertEqual([m.id for m in shown_again], [two.id])

    def test_a_gap_is_held_then_released_in_seq_order(self) -> None:
        node, _bob, shown = self.online_bob()
        messages = [node.append("alice", str(n), peer="bob") for n in range(1, 5)]
        node.live(messages[0])
        node.live(messages[3])  # 2 and 3 missing: held, their fill asked
        node.live(messages[2])  # still after the gap
        self.assertEqual([m.seq for m in shown], [1])
        node.live(messages[1])  # the late one comes before the fill's answer: all go
        self.assertEqual([m.seq for m in shown], [1, 2, 3, 4])
        node.pump()  # the fill's answer brings only duplicates
        self.assertEqual([m.seq for m in shown], [1, 2, 3, 4])
        self.assertEqual([m.through_seq for m in node.of_type(cim_pb2.ACK_R)], [1, 2, 3, 4])

    def test_group_messages_are_shown_in_group_sequence(self) -> None:
        node = TimelineNode("bob")
        node.append("erin", "welcome", group="g")
        node.cursors["g:g"] = 1  # bob is a member, and has seen the first one
        bob, clock, shown = session(node)
        node.connect(bob)
        node.pump()
        messages = [
            node.append(sender, sender, group="g")
            for sender in ("carol", "dave", "alice")  # one timeline, whoever wrote
        ]
        node.live(messages[0])
        node.live(messages[2])
        node.live(messages[1])
        self.assertEqual([getattr(m, "from") for m in shown], ["carol", "dave", "alice"])
        node.pump()
        self.assertEqual(node.cursors["g:g"], 1, "a group's ack:R waits (cumulative)")
        clock.advance(GROUP_ACK_DELAY)
        node.pump()
        self.assertEqual(node.cursors["g:g"], 4)
        acks = [(m.msg_id, m.conversation, m.through_seq) for m in node.of_type(cim_pb2.ACK_R)]
        self.assertEqual(acks, [(messages[2].id, "g:g", 4)], "one ack:R for the three")

    def test_group_messages_whose_ack_never_left_come_again_once_at_catch_up(self) -> None:
        """The connection drops inside the cumulative ack's wait: nothing was
        acknowledged, the catch-up brings the messages again, none is shown twice."""
        node = TimelineNode("bob")
        node.append("erin", "welcome", group="g")
        node.cursors["g:g"] = 1
        bob, clock, shown = session(node)
        node.connect(bob)
        node.pump()
        messages = [node.append("carol", str(n), group="g") for n in range(2, 5)]
        for message in messages:
            node.live(message)
        self.assertEqual([m.seq for m in shown], [2, 3, 4])
        bob.connection_closed(Failure(ConnectionError("cut")))
        clock.advance(GROUP_ACK_DELAY)
        self.assertEqual(node.of_type(cim_pb2.ACK_R), [], "the ack never left")
        self.assertEqual(node.cursors["g:g"], 1)
        node.connect(bob)
        node.pump()
        self.assertEqual([m.seq for m in shown], [2, 3, 4], "shown once")
        self.assertEqual(node.cursors["g:g"], 4, "the catch-up's cursors moved it")

    def test_stop_leaves_what_is_held_unread(self) -> None:
        node, bob, shown = self.online_bob()
        messages = [node.append("alice", str(n), peer="bob") for n in range(1, 4)]
        node.swallow = {cim_pb2.HISTORY_R}
        node.live(messages[0])
        node.live(messages[2])
        node.pump()
        self.successResultOf(Deferred.fromCoroutine(bob.stop()))
        self.assertEqual([m.seq for m in shown], [1])
        self.assertEqual(node.cursors["d:alice:bob"], 1)


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

    def test_the_expiry_is_an_iso_time(self) -> None:
        key = secrets.token_bytes(64)
        body = {
            "token": "t",
            "user": "alice",
            "node": {"id": "n", "host": "h", "port": 1},
            "server_key": base64.b64encode(key).decode(),
            "key_fingerprint": hashlib.sha256(key).hexdigest(),
            "heartbeat_interval": 30,
            "heartbeat_timeout": 90,
            "expires_at": "2027-01-15T08:00:00.250Z",
        }
        self.assertEqual(parse_ticket(body).expires_at, 1_800_000_000.25)
        body["expires_at"] = 1_800_000_000.25  # the old epoch number is not a time
        with self.assertRaises(RouterError):
            parse_ticket(body)

    def test_repr_hides_the_token(self) -> None:
        ticket = LoginTicket(
            "secret-token", "s", "alice", NodeTarget("n", "h", 1), b"", b"", 30, 90, (), 0
        )
        self.assertNotIn("secret-token", repr(ticket))
