"""Timelines (#14) with real daemons: a cluster of two nodes on a private ZooKeeper and
a private Redis, the shared RabbitMQ (queues of the test's own: node ids of its own,
see ``timeline_cluster``) and one SQLite file.

- Acceptance 2: a member that drops after msg:N and before ack:R, and a member that
  moved to another node while a forward to its old node was in flight, each get the
  message exactly once at their next catch-up.
- Acceptance 3: Redis flushed between two group messages: the group's sequence goes on
  (no number given twice) and every member shows one order.

The devices are driven frame by frame (tests.integration.support.frames): nothing is
acknowledged unless the test says so.
"""

from __future__ import annotations

import os
import signal

from sqlalchemy import insert
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.backends.bus import node_queue
from cim.history.store import direct_conversation, group_conversation
from cim.protocols import cim_pb2
from cim.storage.database import open_engine
from cim.storage.schema import group_members, groups
from cim.storage.timeline import group_joined
from tests.integration.support.cluster import Cluster, eventually, own_prefix, ring_of
from tests.integration.support.frames import FrameClient, connect
from tests.integration.test_reliability import shared_broker

GROUP = "t" * 26
NAMES = [f"user{n}" for n in range(40)]


def placed(cluster: Cluster) -> dict[str, list[str]]:
    """The users each node's ring puts there (node id -> names)."""
    ring = ring_of(cluster.nodes)
    by_node: dict[str, list[str]] = {node.node_id: [] for node in cluster.nodes}
    for name in NAMES:
        info = ring.node_for(name)
        assert info is not None
        by_node[info.node_id].append(name)
    return by_node


def make_group(database_url: str, members: list[str]) -> None:
    """The group's rows as GroupDirectory.create writes them (members added, readers
    from seq 0), straight into the shared database."""
    engine = open_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(groups).values(id=GROUP, name="team", owner=members[0], created_at=1.0)
            )
            for index, member in enumerate(members):
                connection.execute(
                    insert(group_members).values(
                        group_id=GROUP,
                        user_name=member,
                        role="owner" if index == 0 else "member",
                        joined_at=1.0,
                    )
                )
            group_joined(connection, GROUP, members)
    finally:
        engine.dispose()


def timeline_cluster(test: TestCase) -> Cluster:
    """Two nodes on the shared broker, started, with node ids no other cluster has
    (``own_prefix`` says why)."""
    prefix = own_prefix("t")
    cluster = Cluster(test, count=2, amqp_url=shared_broker(test), prefix=prefix)
    cluster.start(NAMES)
    return cluster


def consumers(amqp_url: str, queue: str) -> int:
    """How many consumers the broker counts on ``queue`` (0: no such queue)."""
    import pika
    from pika.exceptions import ChannelClosedByBroker

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        frame = connection.channel().queue_declare(queue, passive=True)
        return int(frame.method.consumer_count)
    except ChannelClosedByBroker:
        return 0
    finally:
        connection.close()


class TimelineClusterTests(TestCase):
    timeout = 300

    def cluster(self) -> Cluster:
        return timeline_cluster(self)

    def test_two_clusters_at_once_each_consume_only_their_own_node_queues(self) -> None:
        return ensureDeferred(self._two_at_once())

    async def _two_at_once(self) -> None:
        # What trial -j2 does when two modules build clusters on the shared broker.
        first, second = self.cluster(), self.cluster()
        assert first.amqp_url is not None
        queues = [node_queue(node.node_id) for node in first.nodes + second.nodes]
        self.assertEqual(len(set(queues)), 4, queues)
        url = first.amqp_url
        await eventually(
            lambda: all(consumers(url, queue) >= 1 for queue in queues),
            30,
            "every node consuming its queue",
        )
        # One consumer each: no node reads another cluster's live copies.
        self.assertEqual(
            {queue: consumers(url, queue) for queue in queues}, dict.fromkeys(queues, 1)
        )

    def test_a_receiver_dropping_before_ack_gets_it_once_at_its_next_catch_up(self) -> None:
        return ensureDeferred(self._dropping())

    async def _dropping(self) -> None:
        cluster = self.cluster()
        one, two = cluster.nodes
        homes = placed(cluster)
        alice, bob, carol = homes[one.node_id][0], homes[two.node_id][0], homes[two.node_id][1]
        make_group(cluster.database_url, [alice, bob, carol])
        sender = await connect(one, alice)
        receiver = await connect(two, bob)
        # bob's laptop is known to his account (its first summary enrolled it) and
        # offline while the messages come.
        laptop = await connect(two, bob, device="laptop")
        await laptop.summary()
        laptop.drop()
        await eventually(lambda: laptop.closed, 10, "the laptop's drop")
        sender.post("one to one", to=bob)
        sender.post("to the group", group=GROUP)
        await eventually(lambda: len(receiver.live()) == 2, 20, "both live copies")
        # Durable before promised: msg:A names the conversation and the seq.
        answers = sender.of_type(cim_pb2.MSG_A)
        self.assertEqual(
            sorted((a.conversation, a.seq) for a in answers),
            sorted([(direct_conversation(alice, bob), 1), (group_conversation(GROUP), 1)]),
        )
        shown = {(m.conversation, m.seq): m.id for m in receiver.live()}
        receiver.drop()  # msg:N arrived, ack:R never sent
        await eventually(lambda: receiver.closed, 10, "the drop")
        again = await connect(two, bob)
        summary = await again.summary()
        self.assertEqual(summary.total, 2)
        self.assertEqual(len(summary.conversations), 2)
        pulled = await again.pull()
        self.assertEqual({(m.conversation, m.seq): m.id for m in pulled}, shown)  # once each
        self.assertEqual(await again.acknowledge(pulled), 2)
        self.assertEqual((await again.summary()).total, 0)
        self.assertEqual(await again.pull(), [])
        # Another device of the same user has its own cursor: it still has both.
        laptop = await connect(two, bob, device="laptop")
        self.assertEqual(len(await laptop.pull()), 2)
        # The sender was told "stored" for the 1:1 message (the receiver left holding
        # it), "accepted" for the group's, and never "failed".
        await eventually(lambda: len(sender.of_type(cim_pb2.ACK_N)) == 2, 20, "both outcomes")
        statuses = sorted(a.status for a in sender.of_type(cim_pb2.ACK_N))
        self.assertEqual(statuses, sorted([cim_pb2.STORED, cim_pb2.ACCEPTED]))

    def test_a_receiver_that_moved_during_a_forward_gets_it_once_at_catch_up(self) -> None:
        return ensureDeferred(self._moving())

    async def _moving(self) -> None:
        cluster = self.cluster()
        one, two = cluster.nodes
        homes = placed(cluster)
        alice, bob = homes[one.node_id][0], homes[two.node_id][0]
        sender = await connect(one, alice)
        receiver = await connect(two, bob)
        conversation = direct_conversation(alice, bob)
        sender.post("before the move", to=bob)
        await eventually(lambda: len(receiver.live()) == 1, 20, "the first live copy")
        live_before = list(receiver.live())
        # bob's node hangs (SIGSTOP): the registry and bob's route still name it, so
        # node one forwards the next messages to its bus queue, where they wait: in
        # flight. bob's phone gives up on it and, once the registry has dropped node
        # two, logs in again and lands on node one.
        os.kill(two.process.pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(two.process.pid, signal.SIGCONT))
        for n in range(5):
            sender.post(f"in flight {n}", to=bob)
        await eventually(lambda: len(sender.of_type(cim_pb2.MSG_A)) == 6, 20, "msg:A of all")
        receiver.drop()
        moved = await connect(one, bob, on=one.node_id)
        sender.post("after the move", to=bob)
        await eventually(lambda: len(moved.live(conversation)) == 1, 20, "a live copy on one")
        # Node two wakes up and takes what waited in its queue: bob is not there, so
        # the copies are dropped and bob is told to pull where he is now.
        os.kill(two.process.pid, signal.SIGCONT)
        await eventually(
            lambda: bool(moved.of_type(cim_pb2.OFFLINE_NOTICE)), 60, "the notice to pull"
        )
        notice = moved.of_type(cim_pb2.OFFLINE_NOTICE)[0]
        self.assertEqual(notice.conversation, conversation)
        pulled = await moved.pull()
        # The catch-up brings each message once, every one the device has not
        # acknowledged: the one shown before the move, the five in flight, the one
        # shown after (its cursor never moved).
        self.assertEqual(sorted(m.seq for m in pulled), list(range(1, 8)))
        self.assertEqual(
            [m.text for m in sorted(pulled, key=lambda m: m.seq)][1:6],
            [f"in flight {n}" for n in range(5)],
        )
        self.assertEqual(
            {m.id for m in live_before} | {m.id for m in moved.live()},
            {m.id for m in pulled if m.seq in (1, 7)},
        )
        self.assertEqual(await moved.acknowledge(pulled), 1)
        self.assertEqual(await moved.pull(), [])

    def test_redis_flushed_between_two_group_messages(self) -> None:
        return ensureDeferred(self._flushed())

    async def _flushed(self) -> None:
        cluster = self.cluster()
        one, two = cluster.nodes
        homes = placed(cluster)
        members = homes[one.node_id][:2] + homes[two.node_id][:2]
        make_group(cluster.database_url, members)
        devices: dict[str, FrameClient] = {}
        for member in members:
            node = one if member in homes[one.node_id] else two
            devices[member] = await connect(node, member)
        first, second = members[0], members[2]
        devices[first].post("before the flush", group=GROUP)
        await eventually(
            lambda: all(len(d.live()) == 1 for m, d in devices.items() if m != first),
            20,
            "the first group message",
        )
        cluster.redis.flushall()
        # The nodes rewrite their users' routes into the empty Redis on their next
        # refresh (every ROUTE_TTL / 3, later on a loaded machine); the group's numbers
        # never lived there. Until then a member's route is missing and its live copy is
        # not sent (it catches up from its cursor): wait for the routes, not a guess.
        await eventually(
            lambda: set(members) <= set(one.online()["items"]), 20, "the routes rewritten"
        )
        devices[second].post("after the flush", group=GROUP)
        await eventually(
            lambda: (
                all(len(d.live()) == 2 for m, d in devices.items() if m not in (first, second))
                and len(devices[first].live()) == 1
            ),
            30,
            "the second group message",
        )
        order = [("before the flush", 1), ("after the flush", 2)]
        sent_by = {1: first, 2: second}
        for member, device in devices.items():
            expected = [entry for entry in order if sent_by[entry[1]] != member]
            self.assertEqual([(m.text, m.seq) for m in device.live()], expected, member)
        answers = [a for d in devices.values() for a in d.of_type(cim_pb2.MSG_A)]
        self.assertEqual(sorted(a.seq for a in answers), [1, 2])  # no number given twice
        # Catch-up of a new device shows the same order (no device of the member has
        # read anything, so it starts where the member's first device does: #15).
        fresh = await connect(one if members[1] in homes[one.node_id] else two, members[1], "tab")
        pulled = await fresh.pull(group_conversation(GROUP))
        self.assertEqual([(m.text, m.seq) for m in reversed(pulled)], order)
        fresh.send(cim_pb2.HISTORY_R, cim_pb2.HistoryR(group=GROUP, request_id=99))
        history = await fresh.answer(cim_pb2.HISTORY_A, 99)
        self.assertEqual([(m.text, m.seq) for m in reversed(history.messages)], order)
