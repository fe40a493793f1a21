"""Read receipts on the node (cim.im.receipts): READ_R, READ_N to the user's other
devices and to a 1:1 peer (here or over the bus), the read_receipts setting, the
summary at the next login, READERS_R. In memory, on a fake clock, on real timelines.

"The user's other devices" are a second connection of alice's (her web device) beside
her phone.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cim.history.store import direct_conversation, group_conversation
from cim.im.collaborators import Stores
from cim.protocols import cim_pb2
from cim.storage.accounts import insert_user_txn
from cim.storage.contact_changes import set_settings_txn
from cim.storage.contacts import PrivacyDefaults
from cim.storage.timeline import NewMessage, append_txn, group_joined
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_delivery import cluster, settle

AB = direct_conversation("alice", "bob")
GROUP = "abcdefghijklmnopqrstuvwxyz"


def run(node: NodeHarness, txn: Any, *args: Any) -> Any:
    assert node.database is not None
    result: list[Any] = []
    node.database.run(txn, *args).addBoth(result.append)
    if isinstance(result[0], Exception) or hasattr(result[0], "raiseException"):
        result[0].raiseException()
    return result[0]


def receipts_off(node: NodeHarness, user: str) -> None:
    run(node, insert_user_txn, user, "scrypt$hash", "person", 1.0)
    run(node, set_settings_txn, user, None, None, PrivacyDefaults(), "off")


def send(node: NodeHarness, sender: ConnectedClient, to: str, count: int) -> None:
    for n in range(count):
        message = cim_pb2.Message(to=to, text=f"m{n}", client_seq=100 + n)
        sender.protocol.send(cim_pb2.MSG_R, message)
        settle(node)


def read(node: NodeHarness, who: ConnectedClient, seq: int, request_id: int = 7) -> None:
    who.protocol.send(
        cim_pb2.READ_R, cim_pb2.ReadR(request_id=request_id, conversation=AB, seq=seq)
    )
    settle(node)


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = NodeHarness()
        self.alice = self.node.connect("alice", device="phone", auto_ack=True)
        self.bob = self.node.connect("bob", device="phone")
        settle(self.node)
        send(self.node, self.bob, "alice", 3)
        # alice's web device, online beside her phone.
        self.web = self.node.connect("alice", device="web", auto_ack=True).events
        settle(self.node)

    def test_reading_on_the_phone_reaches_the_web_device_and_the_peer(self) -> None:
        """Acceptance 3: the web device's unread count for bob drops to 0 at once (its
        notice says read up to the newest), and bob sees "read up to 3"."""
        read(self.node, self.alice, 3)
        [answer] = self.alice.events.of_type(cim_pb2.READ_A)
        self.assertEqual((answer.request_id, answer.seq, answer.moved), (7, 3, True))
        self.assertEqual(self.alice.events.of_type(cim_pb2.READ_N), [])  # not to itself
        [own] = self.web.of_type(cim_pb2.READ_N)
        self.assertEqual((own.conversation, own.reader, own.seq, own.last_seq), (AB, "alice", 3, 3))
        self.assertEqual(own.last_seq - own.seq, 0)  # the web device's unread count
        [seen] = self.bob.events.of_type(cim_pb2.READ_N)
        self.assertEqual(
            (seen.conversation, seen.reader, seen.seq, seen.peer), (AB, "alice", 3, "alice")
        )

    def test_with_read_receipts_off_the_peer_sees_nothing(self) -> None:
        receipts_off(self.node, "alice")
        read(self.node, self.alice, 3)
        self.assertEqual(self.bob.events.of_type(cim_pb2.READ_N), [])
        [own] = self.web.of_type(cim_pb2.READ_N)  # her own devices still sync
        self.assertEqual(own.seq, 3)
        bob_again = self.node.connect("bob", device="tablet")  # and not at catch-up either
        bob_again.protocol.send(cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=1))
        settle(self.node)
        [summary] = bob_again.events.of_type(cim_pb2.OFFLINE_SUMMARY_A)
        marks = [c.peer_read_seq for c in summary.conversations] + [
            c.seq for c in summary.peer_reads
        ]
        self.assertEqual([m for m in marks if m], [])

    def test_the_summary_at_the_next_login_agrees(self) -> None:
        read(self.node, self.alice, 2)
        web = self.node.connect("alice", device="web")  # the web device logs in later
        web.protocol.send(cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=1))
        settle(self.node)
        [summary] = web.events.of_type(cim_pb2.OFFLINE_SUMMARY_A)
        [entry] = summary.conversations
        self.assertEqual((entry.conversation, entry.count, entry.read_seq), (AB, 1, 2))
        bob = self.node.connect("bob", device="tablet")  # bob's device that was offline
        bob.protocol.send(cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=2))
        settle(self.node)
        [summary] = bob.events.of_type(cim_pb2.OFFLINE_SUMMARY_A)
        marks = {c.conversation: c.peer_read_seq for c in summary.conversations}
        marks.update({c.conversation: c.seq for c in summary.peer_reads})
        self.assertEqual(marks, {AB: 2})

    def test_bad_marks_get_an_error_and_change_nothing(self) -> None:
        read(self.node, self.alice, 2)
        read(self.node, self.alice, 4, request_id=8)  # past the end
        self.alice.protocol.send(
            cim_pb2.READ_R, cim_pb2.ReadR(request_id=9, conversation="d:alice:zed", seq=1)
        )
        carol = self.node.connect("carol")
        carol.protocol.send(cim_pb2.READ_R, cim_pb2.ReadR(request_id=10, conversation=AB, seq=1))
        settle(self.node)
        errors = self.alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            [(e.request_type, e.request_id, e.code) for e in errors],
            [
                (cim_pb2.READ_R, 8, cim_pb2.Error.BAD_REQUEST),
                (cim_pb2.READ_R, 9, cim_pb2.Error.BAD_REQUEST),
            ],
        )
        [refused] = carol.events.of_type(cim_pb2.ERROR)
        self.assertEqual((refused.request_id, refused.code), (10, cim_pb2.Error.FORBIDDEN))
        self.assertEqual(len(self.web.of_type(cim_pb2.READ_N)), 1)  # only the first moved
        self.assertEqual(len(self.bob.events.of_type(cim_pb2.READ_N)), 1)

    def test_a_conversation_that_is_no_key_is_a_bad_request_not_unavailable(self) -> None:
        for request_id, key in enumerate(("bob", "d:a\x00b", "g:" + "x" * 400), start=20):
            self.alice.protocol.send(
                cim_pb2.READ_R, cim_pb2.ReadR(request_id=request_id, conversation=key, seq=1)
            )
        settle(self.node)
        errors = self.alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual([e.request_id for e in errors], [20, 21, 22])
        self.assertEqual({e.code for e in errors}, {cim_pb2.Error.BAD_REQUEST})

    def test_moving_backwards_is_a_no_op(self) -> None:
        read(self.node, self.alice, 3)
        read(self.node, self.alice, 1, request_id=8)
        answers = self.alice.events.of_type(cim_pb2.READ_A)
        self.assertEqual([(a.seq, a.moved) for a in answers], [(3, True), (3, False)])
        self.assertEqual(len(self.web.of_type(cim_pb2.READ_N)), 1)
        self.assertEqual(len(self.bob.events.of_type(cim_pb2.READ_N)), 1)


class AcrossNodesTests(SynchronousTestCase):
    def test_the_peer_on_another_node_sees_the_read_over_the_bus(self) -> None:
        one, two = cluster()
        alice = one.connect("alice", auto_ack=True)
        bob = two.connect("bob")
        settle(one, two)
        bob.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="alice", text="hi", client_seq=1))
        settle(one, two)
        alice.protocol.send(cim_pb2.READ_R, cim_pb2.ReadR(request_id=1, conversation=AB, seq=1))
        settle(one, two)
        [seen] = bob.events.of_type(cim_pb2.READ_N)
        self.assertEqual((seen.reader, seen.seq), ("alice", 1))


class ReadersTests(SynchronousTestCase):
    def test_the_sender_asks_who_read_its_group_message_and_others_may_not(self) -> None:
        node = NodeHarness()
        conversation = group_conversation(GROUP)
        run(node, group_joined, GROUP, ["alice", "bob", "carol"])
        post = cim_pb2.Message(id=11, group=GROUP, text="hello all")
        setattr(post, "from", "alice")
        run(
            node,
            append_txn,
            [NewMessage(conversation, 11, "alice", "phone", 1, 1.0, post.SerializeToString())],
        )
        alice = node.connect("alice")
        bob = node.connect("bob")
        settle(node)
        bob.protocol.send(
            cim_pb2.READ_R, cim_pb2.ReadR(request_id=1, conversation=conversation, seq=1)
        )
        settle(node)
        self.assertEqual(alice.events.of_type(cim_pb2.READ_N), [])  # a group: no receipt pushed
        ask = cim_pb2.ReadersR(request_id=5, conversation=conversation, seq=1)
        alice.protocol.send(cim_pb2.READERS_R, ask)
        bob.protocol.send(cim_pb2.READERS_R, ask)
        settle(node)
        [answer] = alice.events.of_type(cim_pb2.READERS_A)
        self.assertEqual(
            (answer.request_id, answer.count, list(answer.readers), answer.members),
            (5, 1, ["bob"], 2),
        )
        [refused] = bob.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            (refused.request_type, refused.request_id, refused.code),
            (cim_pb2.READERS_R, 5, cim_pb2.Error.FORBIDDEN),
        )


class WithoutReadMarksTests(SynchronousTestCase):
    def test_a_node_that_keeps_none_says_unavailable(self) -> None:
        node = NodeHarness(stores=Stores())
        alice = node.connect("alice")
        alice.protocol.send(cim_pb2.READ_R, cim_pb2.ReadR(request_id=3, conversation=AB, seq=1))
        settle(node)
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            (error.request_type, error.request_id, error.code),
            (cim_pb2.READ_R, 3, cim_pb2.Error.UNAVAILABLE),
        )
        self.assertGreater(error.retry_after_ms, 0)
