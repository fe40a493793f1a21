"""Promises P1-P3 with real processes: two nodes sharing Redis, ZooKeeper and RabbitMQ.

Nothing is lost (a message whose sender got ack:N reaches the receiver's application),
nothing is duplicated (retries, redeliveries), order holds, even when nodes are killed,
connections are cut, or the broker restarts.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cim.client.connection import ImClientProtocol
from cim.client.router import RouterClient
from cim.client.session import Backoff, ChatClient, DeliveryOutcome
from cim.protocols import cim_pb2
from tests.integration.support.cluster import (
    Cluster,
    eventually,
    own_prefix,
    reactor,
    ring_of,
    sleep,
)
from tests.integration.support.daemons import PASSWORD, DaemonProcess
from tests.integration.support.services import service_missing

SHARED_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
TOLD_OK = ("delivered", "stored")
"""A 1:1 outcome that promises the receiver's application will show the message."""


def shared_broker(test: TestCase) -> str:
    from tests.integration.support.rabbitmq import can_log_in

    if not can_log_in(SHARED_AMQP):
        service_missing(test, "RabbitMQ", f"nothing answers at {SHARED_AMQP}")
    return SHARED_AMQP


class Recorder:
    """ConnectionEvents that keep every frame, for watching the six packets go by."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, Any]] = []
        self.closed = False

    def frame_received(self, frame_type: int, message: Any) -> None:
        self.frames.append((frame_type, message))

    def connection_closed(self, reason: Failure) -> None:
        self.closed = True

    def kinds(self) -> list[int]:
        return [kind for kind, _ in self.frames]

    def of(self, kind: int) -> list[Any]:
        return [message for frame_type, message in self.frames if frame_type == kind]


async def raw_connection(node: DaemonProcess, user: str) -> tuple[ImClientProtocol, Recorder]:
    """A bare protocol (no library retries or dedup) logged in on the node the ring picks."""
    router = RouterClient(reactor, node.router_url)
    ticket = await router.login(user, PASSWORD, "raw")
    recorder = Recorder()
    protocol = ImClientProtocol(
        reactor,
        recorder,
        ticket.server_key,
        ticket.token,
        "raw",
        "chacha20-poly1305",
        ("chacha20-poly1305",),
    )
    endpoint = HostnameEndpoint(reactor, ticket.node.host, ticket.node.port)
    await connectProtocol(endpoint, protocol)
    await protocol.logged_in
    return protocol, recorder


def first_on(cluster: Cluster, node_id: str, prefix: str, count: int = 1) -> list[str]:
    ring = ring_of(cluster.nodes)
    found: list[str] = []
    number = 0
    while len(found) < count:
        name = f"{prefix}{number}"
        number += 1
        if ring.node_for(name).node_id == node_id:  # type: ignore[union-attr]
            found.append(name)
    return found


SETTLE = 5.0
"""How long the soak waits for the last gap fills and catch-ups before counting. Two
daemons, RabbitMQ, Redis and a hundred clients share two cores here: a catch-up after
a cut connection can take seconds."""


def library_client(cluster: Cluster, user: str, seen_dir: str | None = None) -> ChatClient:
    routers = [node.router_url for node in cluster.nodes]
    random.Random(user).shuffle(routers)
    return ChatClient(
        reactor,
        routers,
        user,
        PASSWORD,
        device="lib",
        backoff=Backoff(initial=0.2, maximum=2.0),
        rng=random.Random(user),
        seen_path=os.path.join(seen_dir, f"{user}.seen") if seen_dir else None,
        ordered=True,  # the soak counts order: each conversation's catch-up oldest first
    )


async def stop_all(clients: Iterable[ChatClient]) -> None:
    for client in clients:
        await client.stop(logout=False)


def close(protocols: Iterable[ImClientProtocol]) -> None:
    for protocol in protocols:
        if protocol.transport is not None:
            protocol.transport.loseConnection()


class SixPacketTests(TestCase):
    timeout = 180

    def test_six_frames_in_order_across_two_nodes_over_rabbitmq(self) -> None:
        return ensureDeferred(self._across())

    async def _across(self) -> None:
        prefix = own_prefix("r")
        cluster = Cluster(self, count=2, amqp_url=shared_broker(self), prefix=prefix)
        [alice] = first_on(cluster, f"{prefix}1", "alice")
        [bob] = first_on(cluster, f"{prefix}2", "bob")
        cluster.start([alice, bob])
        sender, sent_frames = await raw_connection(cluster.nodes[0], alice)
        receiver, received_frames = await raw_connection(cluster.nodes[1], bob)
        self.addCleanup(close, [sender, receiver])
        sender.send(cim_pb2.MSG_R, cim_pb2.Message(to=bob, text="across", client_seq=1))
        await eventually(lambda: bool(received_frames.of(cim_pb2.MSG_N)), 10, "msg:N")
        [msg_n] = received_frames.of(cim_pb2.MSG_N)
        receiver.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=msg_n.id))
        await eventually(lambda: bool(sent_frames.of(cim_pb2.ACK_N)), 10, "ack:N")
        self.assertEqual(sent_frames.kinds(), [cim_pb2.MSG_A, cim_pb2.ACK_N])
        self.assertEqual(received_frames.kinds(), [cim_pb2.MSG_N, cim_pb2.ACK_A])
        [msg_a] = sent_frames.of(cim_pb2.MSG_A)
        [ack_n] = sent_frames.of(cim_pb2.ACK_N)
        self.assertEqual(msg_n.id, msg_a.msg_id)
        self.assertEqual(getattr(msg_n, "from"), alice)
        self.assertEqual((ack_n.msg_id, ack_n.status), (msg_a.msg_id, cim_pb2.DELIVERED))


class RetryTests(TestCase):
    timeout = 180

    def test_three_copies_one_delivery_across_a_node_restart(self) -> None:
        return ensureDeferred(self._three_copies())

    async def _three_copies(self) -> None:
        prefix = own_prefix("r")
        cluster = Cluster(self, count=2, amqp_url=shared_broker(self), prefix=prefix)
        [alice] = first_on(cluster, f"{prefix}1", "alice")
        [bob] = first_on(cluster, f"{prefix}2", "bob")
        cluster.start([alice, bob])
        receiver, received = await raw_connection(cluster.nodes[1], bob)
        self.addCleanup(close, [receiver])
        request = cim_pb2.Message(to=bob, text="only once please", client_seq=77)
        answers: list[Any] = []
        for copy in range(3):
            sender, frames = await raw_connection(cluster.nodes[0], alice)
            sender.send(cim_pb2.MSG_R, request)
            await eventually(lambda frames=frames: bool(frames.of(cim_pb2.MSG_A)), 10, "msg:A")
            answers.extend(frames.of(cim_pb2.MSG_A))
            close([sender])
            if copy == 0:
                # The sender's node restarts between the copies: dedup lives in Redis.
                cluster.nodes[0].stop()
                cluster.nodes[0].start()
        self.assertEqual(len(answers), 3)
        self.assertEqual(len({answer.SerializeToString() for answer in answers}), 1)
        await sleep(1.0)
        delivered = {message.id for message in received.of(cim_pb2.MSG_N)}
        self.assertEqual(delivered, {answers[0].msg_id})

    def test_receiver_node_killed_after_ack_r(self) -> None:
        return ensureDeferred(self._killed_after_ack())

    async def _killed_after_ack(self) -> None:
        prefix = own_prefix("r")
        cluster = Cluster(self, count=2, amqp_url=shared_broker(self), prefix=prefix)
        [alice] = first_on(cluster, f"{prefix}1", "alice")
        [bob] = first_on(cluster, f"{prefix}2", "bob")
        cluster.start([alice, bob])
        seen_dir = os.path.abspath(self.mktemp())
        os.makedirs(seen_dir)
        sender = library_client(cluster, alice)
        receiver = library_client(cluster, bob, seen_dir)
        shown: list[cim_pb2.Message] = []
        acked = Deferred[None]()

        def arrived(message: cim_pb2.Message) -> None:
            shown.append(message)
            if not acked.called:
                # The library sends ack:R right after this returns; the receiver's
                # node is killed a moment later, before the sender hears ack:N.
                reactor.callLater(0, cluster.nodes[1].kill)
                reactor.callLater(0, acked.callback, None)

        receiver.on_message = arrived
        self.addCleanup(lambda: ensureDeferred(stop_all([sender, receiver])))
        await DeferredList([sender.start(), receiver.start()], fireOnOneErrback=True)
        outcome_d = sender.send_text(bob, "exactly once")
        await acked
        outcome: DeliveryOutcome = await outcome_d
        # Either the ack made it out before the kill, or the sender retried until the
        # receiver (reconnected to the surviving node) acknowledged it again, or the
        # retry found the receiver's route still naming the dead node and the message
        # was stored under the same id (bob's client drops that copy when it pulls).
        self.assertIn(outcome.status, ("delivered", "stored"))
        await eventually(lambda: receiver.state == "online", 30, "the receiver to come back")
        await sleep(2.0)
        self.assertEqual([m.text for m in shown], ["exactly once"])


class SoakTests(TestCase):
    timeout = 600

    def test_soak_with_connections_cut_at_random(self) -> None:
        return ensureDeferred(self._soak())

    async def _soak(self) -> None:
        pairs = 50
        total = 10_000
        prefix = own_prefix("s")
        # A hundred clients load both cores: a 4 s ZooKeeper session could expire under
        # the load and take a healthy node out of the routers' view for a moment.
        cluster = Cluster(
            self, count=2, amqp_url=shared_broker(self), prefix=prefix, session_timeout=12
        )
        senders = [f"snd{i}" for i in range(pairs)]
        receivers = [f"rcv{i}" for i in range(pairs)]
        cluster.start(senders + receivers)
        seen_dir = os.path.abspath(self.mktemp())
        os.makedirs(seen_dir)
        clients = {user: library_client(cluster, user, seen_dir) for user in senders + receivers}
        self.addCleanup(lambda: ensureDeferred(stop_all(clients.values())))
        shown: dict[str, list[str]] = {user: [] for user in receivers}
        for user in receivers:
            clients[user].on_message = lambda m, user=user: shown[user].append(m.text)
        await DeferredList([c.start() for c in clients.values()], fireOnOneErrback=True)
        placement = {u: c.ticket.node.node_id for u, c in clients.items() if c.ticket}
        self.assertEqual(len(set(placement.values())), 2, "both nodes carry users")

        rng = random.Random(4)
        outcomes: dict[tuple[int, int], Deferred[DeliveryOutcome]] = {}
        per_pair = total // pairs
        # 5% of the client connections, each cut at a random moment of the run.
        victims = rng.sample(senders + receivers, k=len(clients) // 20)
        cut_rounds = {rng.randrange(per_pair): victim for victim in victims}
        cuts = 0
        for round_ in range(per_pair):
            for pair in range(pairs):
                text = f"{pair}:{round_}"
                outcomes[(pair, round_)] = clients[senders[pair]].send_text(receivers[pair], text)
            victim_name = cut_rounds.get(round_)
            if victim_name is not None:
                victim = clients[victim_name]
                if victim.protocol is not None and victim.protocol.transport is not None:
                    victim.protocol.transport.abortConnection()
                    cuts += 1
            await sleep(0.05)  # 1,000 messages a second: the daemons, not the clients, set the pace
        results = await DeferredList(list(outcomes.values()), consumeErrors=True)
        ended = {key: result for key, (ok, result) in zip(outcomes, results, strict=True) if ok}
        self.assertEqual(len(ended), total, "every send ends with an outcome")
        statuses = Counter(result.status for result in ended.values())
        # A 1:1 message ends delivered, stored or failed; anything else is a bug.
        self.assertLessEqual(set(statuses), {"delivered", "stored", "failed"}, statuses)
        # Delivered, or stored and pulled by the receiver when it came back: either way
        # the sender was told, so the receiver's application must show it exactly once.
        reached = {key for key, result in ended.items() if result.status in TOLD_OK}
        failed = [result for result in ended.values() if result.status == "failed"]
        expected: dict[str, set[str]] = {receiver: set() for receiver in receivers}
        for pair, round_ in reached:
            expected[receivers[pair]].add(f"{pair}:{round_}")

        def everything_told_is_shown() -> bool:
            return all(texts <= set(shown[receiver]) for receiver, texts in expected.items())

        # Stored messages come with the receivers' pulls, held ones after the order
        # window: wait (bounded) for the end state, then count whatever is missing.
        waited = await settled(everything_told_is_shown, 60)
        duplicates = lost = out_of_order = 0
        for pair in range(pairs):
            texts = shown[receivers[pair]]
            rounds = [int(text.split(":")[1]) for text in texts]
            duplicates += len(rounds) - len(set(rounds))
            disorder = [(a, b) for a, b in itertools.pairwise(rounds) if b < a]
            out_of_order += len(disorder)
            if disorder and os.environ.get("CIM_SOAK_DEBUG"):
                i = rounds.index(disorder[0][0])
                print(f"\npair {pair}: ...{rounds[max(0, i - 5) : i + 8]}...")
            lost += sum(1 for (p, r) in reached if p == pair and r not in set(rounds))
        print(
            f"\nsoak: {total} sent, {statuses['delivered']} delivered, "
            f"{statuses['stored']} stored, {len(failed)} failed, "
            f"{cuts} connections cut, {lost} lost, {duplicates} duplicates, "
            f"{out_of_order} out of order ({waited})"
        )
        self.assertEqual((lost, duplicates, out_of_order), (0, 0, 0))
        # A cut connection is no reason to give a message up: a cut sender's library
        # resends it on its next connection, a cut receiver's node stores what it had
        # not acknowledged, and every message has the library's whole retry budget.
        self.assertEqual(
            Counter(result.reason for result in failed),
            Counter(),
            "no message fails for a cut connection",
        )


async def settled(check: Callable[[], bool], timeout: float) -> str:
    """Wait (bounded) for an end state the test then counts: how long it took, or that
    it did not come (the counts after it say what is missing, and the test fails)."""
    try:
        took = await eventually(check, timeout, "the end state")
    except AssertionError as passed:
        return str(passed)
    return f"end state after {took:.1f} s"


class GroupOrderTests(TestCase):
    timeout = 300

    def test_fifty_members_over_two_nodes_see_one_order(self) -> None:
        return ensureDeferred(self._group())

    async def _group(self) -> None:
        prefix = own_prefix("g")
        cluster = Cluster(self, count=2, amqp_url=shared_broker(self), prefix=prefix)
        members = [f"member{i}" for i in range(50)]
        cluster.start(members)
        clients = {user: library_client(cluster, user) for user in members}
        self.addCleanup(lambda: ensureDeferred(stop_all(clients.values())))
        shown: dict[str, list[tuple[int, int]]] = {user: [] for user in members}
        for user in members:
            # Group messages only: each invitee also gets its "group.invited" notice.
            clients[user].on_message = lambda m, user=user: (
                shown[user].append((m.group_seq, m.id)) if m.group else None
            )
        await DeferredList([c.start() for c in clients.values()], fireOnOneErrback=True)
        nodes = {c.ticket.node.node_id for c in clients.values() if c.ticket}
        self.assertEqual(len(nodes), 2)
        owner = clients[members[0]]
        answer = await owner.group_request(
            cim_pb2.GroupRequest(create=cim_pb2.CreateGroup(name="fifty", members=members[1:]))
        )
        self.assertTrue(answer.ok, answer.message)
        group_id = answer.group.id
        # Nobody joins without consent (docs/privacy.md): the 49 invitees accept.
        self.assertEqual(sorted(answer.invited), sorted(members[1:]))
        joined = await DeferredList(
            [
                clients[user].group_request(
                    cim_pb2.GroupRequest(accept=cim_pb2.GroupRef(group=group_id))
                )
                for user in members[1:]
            ],
            fireOnOneErrback=True,
        )
        self.assertTrue(all(reply.ok for _, reply in joined))
        await sleep(6.0)  # every node's member cache has seen the new group (cache TTL 5 s)
        senders = members[:5]
        sends = []
        for round_ in range(40):
            for sender in senders:
                sends.append(clients[sender].send_group(group_id, f"{sender}/{round_}"))
            await sleep(0.01)
        outcomes = await DeferredList(sends, fireOnOneErrback=True)
        self.assertTrue(all(result.status == "accepted" for _, result in outcomes))

        def everyone_has_all() -> bool:
            return all(len(shown[user]) == 200 - (40 if user in senders else 0) for user in members)

        await eventually(everyone_has_all, 60, "all 200 group messages everywhere")
        # One order for everyone: the group's sequence, the same message at each number.
        numbering = dict(pair for pairs in shown.values() for pair in pairs)
        self.assertEqual(sorted(numbering), list(range(1, 201)))
        for user, pairs in shown.items():
            self.assertEqual(pairs, sorted(pairs), user)
            self.assertTrue(all(numbering[number] == msg_id for number, msg_id in pairs))


class BrokerRestartTests(TestCase):
    timeout = 300

    def test_rabbitmq_restart_during_cross_node_traffic(self) -> None:
        return ensureDeferred(self._restart())

    async def _restart(self) -> None:
        from tests.integration.support.rabbitmq import PrivateRabbitMQ

        broker = PrivateRabbitMQ(self)
        broker.start()
        prefix = own_prefix("b")
        cluster = Cluster(self, count=2, amqp_url=broker.url, prefix=prefix)
        senders = first_on(cluster, f"{prefix}1", "snd", 5)
        receivers = first_on(cluster, f"{prefix}2", "rcv", 5)
        cluster.start(senders + receivers)
        clients = {u: library_client(cluster, u) for u in senders + receivers}
        self.addCleanup(lambda: ensureDeferred(stop_all(clients.values())))
        shown: dict[str, list[str]] = {u: [] for u in receivers}
        for user in receivers:
            clients[user].on_message = lambda m, user=user: shown[user].append(m.text)
        await DeferredList([c.start() for c in clients.values()], fireOnOneErrback=True)

        outcomes: dict[str, Deferred[DeliveryOutcome]] = {}
        stopped_at = restarted_at = None
        started = time.monotonic()
        for round_ in range(90):
            for sender, receiver in zip(senders, receivers, strict=True):
                text = f"{sender}:{round_}"
                outcomes[text] = clients[sender].send_text(receiver, text)
            if round_ == 15:
                broker.stop()
                stopped_at = time.monotonic() - started
            if round_ == 30:
                broker.start()
                restarted_at = time.monotonic() - started
            await sleep(0.2)
        results = dict(
            zip(outcomes, [r for _, r in await DeferredList(list(outcomes.values()))], strict=True)
        )
        statuses = Counter(outcome.status for outcome in results.values())
        # Every send ends delivered, stored or failed (anything else is a bug); while
        # the broker was away the node fell back to storing what it could not forward.
        self.assertLessEqual(set(statuses), {"delivered", "stored", "failed"}, statuses)
        told_ok = [text for text, outcome in results.items() if outcome.status in TOLD_OK]
        delivered = [text for text, outcome in results.items() if outcome.status == "delivered"]
        failed = {text: outcome for text, outcome in results.items() if outcome.status == "failed"}

        def shown_texts() -> list[str]:
            return [text for texts in shown.values() for text in texts]

        # Delivered or stored: the receiver's application shows it (a stored one once the
        # receiver's library pulls it), exactly once. Wait for that end state (bounded).
        waited = await settled(lambda: set(shown_texts()) >= set(told_ok), 60)
        everything_shown = shown_texts()
        lost = [text for text in told_ok if text not in everything_shown]
        after = [t for t in delivered if int(t.split(":")[1]) >= 80]
        print(
            f"\nbroker stopped at {stopped_at:.1f} s, back at {restarted_at:.1f} s: "
            f"{statuses['delivered']} of {len(results)} delivered, {statuses['stored']} "
            f"stored, {len(failed)} failed {dict(Counter(o.reason for o in failed.values()))}, "
            f"{len(lost)} lost ({waited})"
        )
        self.assertEqual(lost, [], "told delivered or stored, never shown")
        self.assertEqual(len(everything_shown), len(set(everything_shown)), "shown twice")
        # Refusing is right only while the broker is away: a node that can neither
        # forward nor store (the offline store is behind the broker) tells the sender.
        # Before the stop (round 15) and once the links are back (round 80, ~10 s after
        # the restart) nothing may fail.
        outside = sorted(t for t in failed if not 15 <= int(t.split(":")[1]) < 80)
        self.assertEqual(outside, [], "failed while the broker was up")
        self.assertEqual(len(after), 50, "forwarding resumed by itself")
