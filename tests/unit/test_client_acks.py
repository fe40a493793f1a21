"""cim.client.acks: a group conversation's ack:R stands for many messages."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.client.acks import GROUP_ACK_DELAY, CumulativeAcks
from cim.protocols import cim_pb2


def message(conversation: str, seq: int) -> cim_pb2.Message:
    return cim_pb2.Message(id=1000 + seq, conversation=conversation, seq=seq)


class CumulativeAcksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[tuple[int, str, int]] = []
        self.acks = CumulativeAcks(
            self.clock,
            lambda ack: self.sent.append((ack.msg_id, ack.conversation, ack.through_seq)),
            every=3,
        )

    def test_a_direct_message_is_acknowledged_at_once(self) -> None:
        self.acks.acknowledge(message("d:alice:bob", 1), 1)
        self.assertEqual(self.sent, [(1001, "d:alice:bob", 1)])
        self.assertEqual(self.acks.owed, 0)

    def test_without_a_watermark_each_group_message_is_acknowledged_at_once(self) -> None:
        """through_seq 0 moves no cursor, so it cannot stand for the others."""
        self.acks.acknowledge(message("g:g1", 5), 0)
        self.acks.acknowledge(message("g:g1", 6), 0)
        self.assertEqual(self.sent, [(1005, "g:g1", 0), (1006, "g:g1", 0)])

    def test_every_nth_group_message_sends_one_ack_for_all(self) -> None:
        for seq in (1, 2, 3, 4):
            self.acks.acknowledge(message("g:g1", seq), seq)
        self.assertEqual(self.sent, [(1003, "g:g1", 3)])
        self.assertEqual(self.acks.owed, 1)

    def test_the_rest_goes_after_the_delay_one_per_conversation(self) -> None:
        self.acks.acknowledge(message("g:g1", 7), 7)
        self.acks.acknowledge(message("g:g2", 2), 2)
        self.acks.acknowledge(message("g:g1", 8), 8)
        self.clock.advance(GROUP_ACK_DELAY - 0.01)
        self.assertEqual(self.sent, [])
        self.clock.advance(0.01)
        self.assertEqual(sorted(self.sent), [(1002, "g:g2", 2), (1008, "g:g1", 8)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_watermark_never_goes_back(self) -> None:
        """A duplicate acknowledged again (a lower seq) does not lower through_seq."""
        self.acks.acknowledge(message("g:g1", 9), 9)
        self.acks.acknowledge(message("g:g1", 4), 9)
        self.acks.flush()
        self.assertEqual(self.sent, [(1004, "g:g1", 9)])

    def test_flush_sends_now_and_forget_drops(self) -> None:
        self.acks.acknowledge(message("g:g1", 1), 1)
        self.acks.flush()
        self.assertEqual(self.sent, [(1001, "g:g1", 1)])
        self.acks.acknowledge(message("g:g1", 2), 2)
        self.acks.forget()
        self.clock.advance(GROUP_ACK_DELAY)
        self.assertEqual(self.sent, [(1001, "g:g1", 1)], "a lost connection sends nothing")
        self.assertEqual(self.clock.getDelayedCalls(), [])
