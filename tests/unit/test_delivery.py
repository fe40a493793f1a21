"""Reliable delivery on the node: retries deduplicated, nodes forwarding over the bus,
group fan-out in order. In memory, on a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.bus.memory import MemoryBroker, MemoryBus
from cim.backends.state.memory import MemoryState
from cim.protocols import cim_pb2
from tests.fakes.node import ConnectedClient, KnownUsers, NodeHarness


def kinds(client: ConnectedClient) -> list[int]:
    return [kind for kind, _ in client.events.frames]


def settle(*nodes: NodeHarness) -> None:
    for _ in range(20):
        nodes[0].clock.advance(0)
        for node in nodes:
            node.flush_all()


class RetryTests(SynchronousTestCase):
    def test_same_msg_r_three_times_one_delivery_three_identical_msg_a(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")  # does not ack yet
        request = cim_pb2.Message(to="bob", text="once", client_seq=41)
        for _ in range(3):
            alice.protocol.send(cim_pb2.MSG_R, request)
            settle(node)
        answers = alice.events.of_type(cim_pb2.MSG_A)
        self.assertEqual(len(answers), 3)
        self.assertEqual(len({a.SerializeToString() for a in answers}), 1)
        [delivered] = bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual(delivered.id, answers[0].msg_id)

    def test_retry_after_the_outcome_gets_it_again_without_delivering(self) -> None:
        self.retry_after_the_outcome(at_once=True)

    def test_an_outcome_recorded_through_a_deferred_is_found_by_a_retry(self) -> None:
        """A store in another process (Redis) records outcomes through a Deferred."""
        self.retry_after_the_outcome(at_once=False)

    def retry_after_the_outcome(self, at_once: bool) -> None:
        node = NodeHarness()
        recorded: list[int] = []
        store = node.state.receipts
        real = store.record_outcome

        def record(sender: str, device: str, seq: int, status: int, reason: str) -> Any:
            recorded.append(status)
            return real(sender, device, seq, status, reason)

        store.record_outcome = record  # type: ignore[method-assign]
        if not at_once:
            node.im.routing._record_now = None
        alice = node.connect("alice")
        bob = node.connect("bob", auto_ack=True)
        request = cim_pb2.Message(to="bob", text="hello", client_seq=7)
        alice.protocol.send(cim_pb2.MSG_R, request)
        settle(node)
        alice.protocol.send(cim_pb2.MSG_R, request)
        settle(node)
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 1)
        first, second = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(first, second)
        self.assertEqual(first.status, cim_pb2.DELIVERED)
        # The memory store records at once, not through its Deferred method (each answer
        # records its outcome, the retry's too).
        self.assertEqual(recorded, [] if at_once else [cim_pb2.DELIVERED] * 2)

    def test_retry_reaches_another_node_through_shared_state(self) -> None:
        """The dedup window lives in the state store, not in one node's memory."""
        state_clock = NodeHarness().clock
        shared = MemoryState(state_clock)
        known = KnownUsers()
        one = NodeHarness(node_id="node1", clock=state_clock, state=shared, known=known)
        two = NodeHarness(
            node_id="node2", clock=state_clock, state=shared, known=known, database=one.database
        )
        alice_on_one = one.connect("alice")
        request = cim_pb2.Message(to="carol", text="x", client_seq=9)
        alice_on_one.protocol.send(cim_pb2.MSG_R, request)
        settle(one)
        alice_on_two = two.connect("alice")
        alice_on_two.protocol.send(cim_pb2.MSG_R, request)
        settle(one, two)
        [first] = alice_on_one.events.of_type(cim_pb2.MSG_A)
        [again] = alice_on_two.events.of_type(cim_pb2.MSG_A)
        self.assertEqual(first, again)

    def test_a_stored_message_is_read_once_and_a_resend_adds_nothing(self) -> None:
        node = NodeHarness(users=("bob",))
        alice = node.connect("alice")
        request = cim_pb2.Message(to="bob", text="are you there", client_seq=4)
        alice.protocol.send(cim_pb2.MSG_R, request)
        settle(node)
        [stored] = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(stored.status, cim_pb2.STORED)
        bob = node.connect("bob", auto_ack=True)
        alice.protocol.send(cim_pb2.MSG_R, request)  # the user's resend, same sequence
        settle(node)
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])  # settled: not again
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N)[-1].status, cim_pb2.STORED)
        bob.protocol.send(cim_pb2.OFFLINE_R, cim_pb2.OfflineR(request_id=1))
        settle(node)
        [page] = bob.events.of_type(cim_pb2.OFFLINE_A)
        self.assertEqual([(m.id, m.seq) for m in page.messages], [(stored.msg_id, 1)])

    def test_a_reconnected_receiver_gets_what_its_old_connection_held(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")  # receives, never acks, then its link silently dies
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=1))
        settle(node)
        [held] = bob.events.of_type(cim_pb2.MSG_N)
        bob_again = node.connect(token=bob.token)  # fast reconnect, same session
        settle(node)
        self.assertEqual([m.id for m in bob_again.events.of_type(cim_pb2.MSG_N)], [held.id])

    def test_unacknowledged_messages_are_stored_after_the_deadline(self) -> None:
        from cim.im.routing import PENDING_TIMEOUT

        node = NodeHarness()
        alice = node.connect("alice")
        node.connect("bob")  # never acks, stays connected
        for seq in range(1, 4):
            alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=seq))
        settle(node)
        self.assertEqual(node.im.routing.expire_pending(), 0)
        for _ in range(int(PENDING_TIMEOUT // 10)):  # heartbeats keep both connected
            node.clock.advance(10)
            settle(node)
        self.assertEqual(node.im.routing.expire_pending(), 3)
        settle(node)
        outcomes = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual([a.status for a in outcomes], [cim_pb2.STORED] * 3)
        self.assertEqual(node.im.routing._pending, {})

    def test_state_store_down_refuses_with_unavailable(self) -> None:
        from twisted.internet.defer import fail

        from cim.interfaces import StateUnavailable

        node = NodeHarness()
        alice = node.connect("alice")
        # A store in another process (Redis) answers with a Deferred: no claim at once.
        node.im.direct._remember_now = None
        node.state.receipts.remember_message = lambda *a: fail(StateUnavailable("down"))  # type: ignore[method-assign]
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=3))
        settle(node)
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual((error.code, error.client_seq), (cim_pb2.Error.UNAVAILABLE, 3))
        self.assertEqual(alice.events.of_type(cim_pb2.MSG_A), [])

    def test_a_claim_at_once_that_fails_refuses_with_unavailable(self) -> None:
        from cim.interfaces import MessageReceipt, StateUnavailable

        node = NodeHarness()
        alice = node.connect("alice")

        def down(sender: str, device: str, seq: int, msg_id: int, at: int) -> MessageReceipt:
            raise StateUnavailable("down")

        node.im.direct._remember_now = down  # type: ignore[assignment]
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=3))
        settle(node)
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual((error.code, error.client_seq), (cim_pb2.Error.UNAVAILABLE, 3))
        self.assertEqual(alice.events.of_type(cim_pb2.MSG_A), [])


def cluster(groups: Any = None) -> tuple[NodeHarness, NodeHarness]:
    """Two nodes on one clock, state store, bus broker and database."""
    first = NodeHarness()
    clock = first.clock
    state = MemoryState(clock)
    broker = MemoryBroker(clock)
    known = KnownUsers()
    nodes = tuple(
        NodeHarness(
            node_id=node_id,
            clock=clock,
            state=state,
            bus=MemoryBus(clock, node_id, broker),
            groups=groups,
            known=known,
            database=first.database,
        )
        for node_id in ("node1", "node2")
    )
    for node in nodes:
        assert node.bus is not None
        node.bus.start()
    return nodes  # type: ignore[return-value]


class CumulativeAckTests(SynchronousTestCase):
    """ack:R with conversation + through_seq acknowledges everything up to it there."""

    def test_one_ack_settles_every_earlier_message_of_the_conversation(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")  # acknowledges by hand
        for seq in (1, 2, 3):
            request = cim_pb2.Message(to="bob", text=str(seq), client_seq=seq)
            alice.protocol.send(cim_pb2.MSG_R, request)
            settle(node)
        received = bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual([m.seq for m in received], [1, 2, 3])
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N), [])
        # The second message's ack, standing for the first two: the third stays open.
        second = received[1]
        bob.protocol.send(
            cim_pb2.ACK_R,
            cim_pb2.AckR(
                msg_id=second.id, conversation=second.conversation, through_seq=second.seq
            ),
        )
        settle(node)
        outcomes = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(sorted(a.client_seq for a in outcomes), [1, 2])
        self.assertTrue(all(a.status == cim_pb2.DELIVERED for a in outcomes))
        self.assertEqual(len(bob.events.of_type(cim_pb2.ACK_A)), 1, "one ack:A per ack:R")
        # A cumulative ack naming no message settles the rest.
        bob.protocol.send(
            cim_pb2.ACK_R, cim_pb2.AckR(conversation=second.conversation, through_seq=3)
        )
        settle(node)
        outcomes = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(sorted(a.client_seq for a in outcomes), [1, 2, 3])
        self.assertEqual(node.metrics.messages["delivered"], 3)
        self.assertEqual(len(bob.events.of_type(cim_pb2.ACK_A)), 2)

    def test_an_ack_in_another_conversation_settles_nothing_here(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        carol = node.connect("carol")
        bob = node.connect("bob")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="a", client_seq=1))
        carol.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="c", client_seq=1))
        settle(node)
        from_alice, from_carol = sorted(
            bob.events.of_type(cim_pb2.MSG_N), key=lambda m: getattr(m, "from")
        )
        bob.protocol.send(
            cim_pb2.ACK_R,
            cim_pb2.AckR(conversation=from_carol.conversation, through_seq=from_carol.seq + 5),
        )
        settle(node)
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N), [])
        [outcome] = carol.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(outcome.status, cim_pb2.DELIVERED)
        self.assertNotEqual(from_alice.conversation, from_carol.conversation)


class AcrossNodesTests(SynchronousTestCase):
    def test_six_packets_across_two_nodes(self) -> None:
        one, two = cluster()
        alice = one.connect("alice")
        bob = two.connect("bob", auto_ack=True)
        settle(one, two)
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=1))
        settle(one, two)
        self.assertEqual(kinds(alice), [cim_pb2.MSG_A, cim_pb2.ACK_N])
        self.assertEqual(kinds(bob), [cim_pb2.MSG_N, cim_pb2.ACK_A])
        [msg_n] = bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual(getattr(msg_n, "from"), "alice")
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N)[0].status, cim_pb2.DELIVERED)
        self.assertEqual(one.metrics.messages["forwarded"], 1)

    def test_sender_moved_to_another_node_still_gets_ack_n(self) -> None:
        one, two = cluster()
        alice = two.connect("alice")
        bob = two.connect("bob")
        settle(one, two)
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=5))
        settle(one, two)
        [msg_n] = bob.events.of_type(cim_pb2.MSG_N)
        # alice logs in again and lands on node1 before bob acknowledges on node2.
        token, _ = one.login("alice")
        alice_again = one.connect(token=token)
        settle(one, two)
        bob.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=msg_n.id))
        settle(one, two)
        [ack_n] = alice_again.events.of_type(cim_pb2.ACK_N)
        self.assertEqual((ack_n.client_seq, ack_n.status), (5, cim_pb2.DELIVERED))

    def test_receivers_on_other_nodes_are_told_to_pull(self) -> None:
        one, two = cluster()
        bob = two.connect("bob")
        carol = one.connect("carol")
        settle(one, two)
        one.im.catchup.stored_for(["bob", "carol", "nobody"])
        settle(one, two)
        self.assertEqual(len(bob.events.of_type(cim_pb2.OFFLINE_NOTICE)), 1)
        self.assertEqual(len(carol.events.of_type(cim_pb2.OFFLINE_NOTICE)), 1)

    def test_stores_in_one_turn_look_their_receivers_up_once(self) -> None:
        one, two = cluster()
        bob = two.connect("bob")
        settle(one, two)
        catchup = one.im.catchup
        peers: Any = catchup._peers
        asked: list[list[str]] = []
        real = peers.nodes_of

        def nodes_of(users: list[str]) -> Any:
            asked.append(sorted(users))
            return real(users)

        peers.nodes_of = nodes_of
        done = [catchup.stored_for(["bob"], "c:1", seq) for seq in (3, 5, 4)]
        done.append(catchup.stored_for(["bob", "nobody"], "c:2", 1))
        self.assertEqual(asked, [])  # at the end of the turn, after every store of it
        settle(one, two)
        self.assertEqual(asked, [["bob", "nobody"]])
        for d in done:
            self.successResultOf(d)
        notices = bob.events.of_type(cim_pb2.OFFLINE_NOTICE)
        self.assertEqual(sorted((n.conversation, n.seq) for n in notices), [("c:1", 5), ("c:2", 1)])
        # The next turn looks up again: a receiver may have moved meanwhile.
        catchup.stored_for(["bob"], "c:1", 6)
        settle(one, two)
        self.assertEqual(len(asked), 2)

    def test_a_route_to_a_dead_node_is_left_for_catch_up_at_once(self) -> None:
        one, two = cluster()
        alice = one.connect("alice")
        two.connect("bob")
        settle(one, two)
        one.peers.alive = {"node1"}  # type: ignore[attr-defined]  # the registry lost node2
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=8))
        settle(one, two)
        [ack_n] = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual((ack_n.status, ack_n.reason), (cim_pb2.STORED, ""))
        self.assertEqual(one.metrics.messages["forwarded"], 0)

    def test_an_unreachable_node_leaves_the_message_for_catch_up(self) -> None:
        one, two = cluster()
        alice = one.connect("alice")
        two.connect("bob")
        settle(one, two)
        one.bus.publish = lambda node, payload: _unavailable()  # type: ignore[method-assign,union-attr]
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=2))
        settle(one, two)
        [ack_n] = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual((ack_n.status, ack_n.reason), (cim_pb2.STORED, ""))


def _unavailable() -> Deferred[None]:
    from twisted.internet.defer import fail

    from cim.interfaces import BusUnavailable

    return fail(BusUnavailable("broker down"))


class FakeGroups:
    def __init__(self, members: dict[str, list[str]]) -> None:
        self.members = members

    def is_member(self, group: str, user: str) -> Deferred[bool]:
        return succeed(user in self.members.get(group, []))

    def member_names(self, group: str) -> Deferred[list[str]]:
        return succeed(list(self.members.get(group, [])))

    def answer(self, actor: str, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        return succeed(cim_pb2.GroupAnswer(request_id=request.request_id, ok=True))


class HeldGroups(FakeGroups):
    """Member lists read only when the test releases them: the fan-out waits, and the
    messages posted meanwhile queue behind it."""

    def __init__(self, members: dict[str, list[str]]) -> None:
        super().__init__(members)
        self.waiting: list[tuple[str, Deferred[list[str]]]] = []

    def member_names(self, group: str) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        self.waiting.append((group, d))
        return d

    def release(self) -> int:
        """Answer every read asked so far (with the list as it is now); how many."""
        waiting, self.waiting = self.waiting, []
        for group, d in waiting:
            d.callback(list(self.members.get(group, [])))
        return len(waiting)


class GroupFanOutTests(SynchronousTestCase):
    def test_members_on_both_nodes_see_the_same_order(self) -> None:
        names = [f"m{i}" for i in range(60)]
        groups = FakeGroups({"g1": names})
        one, two = cluster(groups)
        clients = {
            name: (one if i % 2 else two).connect(name, auto_ack=True)
            for i, name in enumerate(names)
        }
        settle(one, two)
        senders = names[:3]
        for round_ in range(4):
            for sender in senders:
                clients[sender].protocol.send(
                    cim_pb2.MSG_R,
                    cim_pb2.Message(group="g1", text=f"{sender}-{round_}", client_seq=round_ + 1),
                )
            settle(one, two)
        accepted = [
            ack for sender in senders for ack in clients[sender].events.of_type(cim_pb2.ACK_N)
        ]
        self.assertEqual(len(accepted), 12)
        self.assertTrue(all(ack.status == cim_pb2.ACCEPTED for ack in accepted))
        orders = set()
        for name, client in clients.items():
            received = client.events.of_type(cim_pb2.MSG_N)
            ids = [m.id for m in received]
            expected = 12 - sum(1 for s in senders if s == name) * 4
            self.assertEqual(len(ids), expected, name)
            # Messages taken by one node reach every member in that node's id order; the
            # client library merges the nodes' streams by id (its ordering window).
            for origin in (1, 2):
                from_origin = [i for i in ids if (i >> 12) & 0x3FF == origin]
                self.assertEqual(from_origin, sorted(from_origin), name)
            if name not in senders:
                orders.add(tuple(sorted(ids)))
        self.assertEqual(len(orders), 1)

    def backlog(self, join_after: int) -> tuple[NodeHarness, list[bytes], ConnectedClient]:
        """Four posts queue behind the first one's member list; the lists are then read
        one at a time, dave joining after the ``join_after``-th read (0: never).
        Returns the node, bob's connection's writes, and dave's client."""
        groups = HeldGroups({"g1": ["alice", "bob", "carol"]})
        one, _ = cluster(groups)
        alice = one.connect("alice")
        bob = one.connect("bob")
        one.connect("carol")
        dave = one.connect("dave")
        settle(one)
        writes: list[bytes] = []
        original = bob.server_transport.write

        def recording(data: bytes) -> None:
            writes.append(bytes(data))
            original(data)

        bob.server_transport.write = recording  # type: ignore[method-assign]
        for n in range(1, 5):
            alice.protocol.send(
                cim_pb2.MSG_R, cim_pb2.Message(group="g1", text=str(n), client_seq=n)
            )
            settle(one)
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [], "the member list waits")
        for read in range(1, 5):
            self.assertEqual(groups.release(), 1)
            if read == join_after:
                groups.members["g1"].append("dave")
            settle(one)
        self.assertEqual(groups.waiting, [])
        self.assertEqual([m.text for m in bob.events.of_type(cim_pb2.MSG_N)], ["1", "2", "3", "4"])
        return one, writes, dave

    def test_a_backlog_goes_out_together_one_write_per_connection(self) -> None:
        one, writes, _ = self.backlog(join_after=0)
        # Message 1 alone (nothing queued yet), then 2, 3 and 4 in one write.
        self.assertEqual(len(writes), 2)
        self.assertEqual(one.metrics.messages["group_delivered"], 8)

    def test_a_member_list_that_changed_within_a_batch_goes_one_by_one(self) -> None:
        one, writes, dave = self.backlog(join_after=2)
        self.assertEqual(len(writes), 4)
        self.assertEqual([m.text for m in dave.events.of_type(cim_pb2.MSG_N)], ["3", "4"])
        self.assertEqual(one.metrics.messages["group_delivered"], 10)

    def test_a_group_retry_after_an_append_failure_still_fans_out(self) -> None:
        from cim.history.timeline import TimelineUnavailable

        groups = FakeGroups({"g1": ["alice", "bob"]})
        one, _ = cluster(groups)
        alice = one.connect("alice")
        bob = one.connect("bob", auto_ack=True)
        taking = one.timelines.take
        # Every append goes through ``take``, with a Deferred or without one.
        one.timelines.take = lambda m, d, answer: answer.errback(TimelineUnavailable("down"))  # type: ignore[method-assign]
        request = cim_pb2.Message(group="g1", text="hello", client_seq=1)
        alice.protocol.send(cim_pb2.MSG_R, request)
        settle(one)
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual(error.code, cim_pb2.Error.UNAVAILABLE)
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N), [])  # never "accepted"
        one.timelines.take = taking  # type: ignore[method-assign]
        alice.protocol.send(cim_pb2.MSG_R, request)
        settle(one)
        self.assertEqual([m.text for m in bob.events.of_type(cim_pb2.MSG_N)], ["hello"])
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N)[-1].status, cim_pb2.ACCEPTED)

    def test_a_copy_for_a_member_who_moved_is_dropped_and_she_is_told_to_pull(self) -> None:
        groups = FakeGroups({"g1": ["alice", "carol"]})
        one, two = cluster(groups)
        carol = one.connect("carol")  # she is on node one now
        settle(one, two)
        message = cim_pb2.Message(id=77, group="g1", text="late", conversation="g:g1", seq=4)
        setattr(message, "from", "alice")
        envelope = cim_pb2.BusEnvelope(
            origin_node="node1",
            deliver=cim_pb2.BusDelivery(message=message, receivers=["carol"]),
        )
        # A copy node one sent to node two while carol was still there, arriving late.
        two.im.routing.bus_message_received(envelope.SerializeToString())
        settle(one, two)
        self.assertEqual(carol.events.of_type(cim_pb2.MSG_N), [])
        [notice] = carol.events.of_type(cim_pb2.OFFLINE_NOTICE)
        self.assertEqual((notice.conversation, notice.seq), ("g:g1", 4))
        self.assertEqual(two.metrics.messages["group_missed"], 1)

    def test_only_members_can_post(self) -> None:
        groups = FakeGroups({"g1": ["alice", "bob"]})
        one, _ = cluster(groups)
        mallory = one.connect("mallory")
        bob = one.connect("bob")
        mallory.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(group="g1", text="x", client_seq=1))
        settle(one)
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        [error] = mallory.events.of_type(cim_pb2.ERROR)
        self.assertEqual(error.message, "only members can post to a group")
