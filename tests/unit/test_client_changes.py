"""The client library's recall and edit (#15): ``ChatClient.recall``/``edit`` against a
NodeHarness with real timelines, the other side's ``on_change`` live and at its next
catch-up, the inbox's remembered messages read as changed, refusals as
``RequestRefused`` with the node's reason. Fake clock, in-memory transports."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cim.client.answers import RequestRefused
from cim.client.corrections import Change, Corrections, change_of
from cim.protocols import cim_pb2
from tests.fakes.node import NodeHarness
from tests.unit.test_client_session import make_client, settle


class Device:
    """A ChatClient that takes everything and records what it was told."""

    def __init__(self, node: NodeHarness, user: str) -> None:
        self.client, _, _ = make_client(node, user)
        self.messages: list[cim_pb2.Message] = []
        self.changes: list[Change] = []
        self.client.on_message = self.took_message
        self.client.on_change = self.took_change

    def took_message(self, message: cim_pb2.Message) -> bool:
        self.messages.append(message)
        return True

    def took_change(self, change: Change) -> bool:
        self.changes.append(change)
        return True


def online(node: NodeHarness, *devices: Device) -> None:
    for device in devices:
        device.client.start()
    settle(node)


def wait(node: NodeHarness, seconds: float) -> None:
    for _ in range(max(1, round(seconds / 10))):
        settle(node, 10)


class ClientChangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = NodeHarness(users=("alice", "bob"))
        self.alice = Device(self.node, "alice")
        self.bob = Device(self.node, "bob")
        online(self.node, self.alice, self.bob)
        outcome = self.alice.client.send_text("bob", "meet at 5")
        settle(self.node)
        self.assertEqual(self.successResultOf(outcome).status, "delivered")
        [self.sent] = self.bob.messages

    def result(self, d: Any) -> Any:
        settle(self.node)
        return self.successResultOf(d)

    def test_recall_reaches_the_other_side_and_its_inbox_forgets_the_text(self) -> None:
        change = self.result(self.alice.client.recall(self.sent.id))
        self.assertEqual(
            (change.event, change.msg_id, change.by), ("recall", self.sent.id, "alice")
        )
        [seen] = self.bob.changes
        self.assertEqual(
            (seen.event, seen.msg_id, seen.seq), ("recall", self.sent.id, self.sent.seq)
        )
        # The message bob's application was handed now reads as recalled.
        self.assertIs(seen.message, self.sent)
        self.assertEqual((self.sent.text, self.sent.recalled), ("", True))
        self.assertEqual(self.bob.client.corrections.get(self.sent.id), self.sent)

    def test_edit_reaches_the_other_side_with_the_new_text(self) -> None:
        wait(self.node, 300)
        change = self.result(self.alice.client.edit(self.sent.id, "meet at 6"))
        self.assertEqual((change.event, change.text), ("edit", "meet at 6"))
        [seen] = self.bob.changes
        self.assertEqual((seen.event, seen.text), ("edit", "meet at 6"))
        self.assertEqual((self.sent.text, self.sent.edited), ("meet at 6", True))

    def test_a_device_away_finds_the_recall_at_its_next_catch_up(self) -> None:
        self.successResultOf(self.bob.client.stop())
        settle(self.node)
        self.result(self.alice.client.recall(self.sent.id))
        later = Device(self.node, "bob")  # bob's next run: a fresh library
        online(self.node, later)
        [seen] = later.changes
        self.assertEqual((seen.event, seen.msg_id), ("recall", self.sent.id))
        self.assertEqual(later.messages, [])  # the message itself was taken before

    def test_refusals_carry_the_reason_and_change_nothing(self) -> None:
        refused = self.bob.client.recall(self.sent.id)
        settle(self.node)
        refusal = self.failureResultOf(refused, RequestRefused)
        self.assertEqual(refusal.value.reason, "not_yours")
        wait(self.node, 130)
        late = self.alice.client.recall(self.sent.id)
        settle(self.node)
        self.assertEqual(self.failureResultOf(late, RequestRefused).value.reason, "too_late")
        wait(self.node, 800)
        late = self.alice.client.edit(self.sent.id, "too late")
        settle(self.node)
        self.assertEqual(self.failureResultOf(late, RequestRefused).value.reason, "too_late")
        self.assertEqual(self.bob.changes, [])
        self.assertEqual(self.sent.text, "meet at 5")

    def test_the_senders_own_change_moves_its_watermark(self) -> None:
        change = self.result(self.alice.client.recall(self.sent.id))
        self.assertEqual(
            self.alice.client.inbox.watermark(self.sent.conversation), change.entry_seq
        )


class CorrectionsTests(SynchronousTestCase):
    def test_a_message_not_remembered_is_left_to_the_application(self) -> None:
        entry = cim_pb2.Message(id=9, change=cim_pb2.EDIT, replaces=3, replaces_seq=2, text="x")
        change = change_of(entry)
        assert change is not None
        self.assertIsNone(Corrections().apply(change).message)

    def test_a_change_applies_only_within_its_conversation(self) -> None:
        corrections = Corrections()
        corrections.remember(cim_pb2.Message(id=3, text="mine", conversation="d:a:b", seq=2))
        entry = cim_pb2.Message(
            id=9, change=cim_pb2.RECALL, replaces=3, replaces_seq=2, conversation="d:b:c"
        )
        change = change_of(entry)
        assert change is not None
        self.assertIsNone(corrections.apply(change).message)
        self.assertEqual(corrections.get(3).text, "mine")  # type: ignore[union-attr]

    def test_only_so_many_messages_are_remembered(self) -> None:
        corrections = Corrections(size=2)
        for msg_id in (1, 2, 3):
            corrections.remember(cim_pb2.Message(id=msg_id))
        self.assertEqual((len(corrections), corrections.get(1)), (2, None))

    def test_a_message_is_no_change(self) -> None:
        self.assertIsNone(change_of(cim_pb2.Message(id=1, text="hi")))
