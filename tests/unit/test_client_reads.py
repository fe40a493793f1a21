"""The client library's read marks (cim.client.reads, ChatClient.mark_read/on_read):
unread counts per conversation from the summary, live messages and READ_N; the
user's other device reading drops them at once; the peer's "read up to n".

A ``TimelineNode`` (tests/fakes) answers the session's frames; READ_N frames are
handed to the session as the node would send them.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cim.client.answers import RequestRefused
from cim.client.reads import ReadEvent, ReadState, conversation_key
from cim.protocols import cim_pb2
from tests.fakes.timeline_node import TimelineNode, session

AB = "d:alice:bob"


class DeviceTests(SynchronousTestCase):
    def setUp(self) -> None:
        # alice's web device, online: bob's three messages arrive live.
        self.node = TimelineNode("alice")
        self.client, self.clock, self.shown = session(self.node)
        self.events: list[ReadEvent] = []
        self.client.on_read = self.events.append
        self.node.connect(self.client)
        self.node.pump()
        for text in ("one", "two", "three"):
            self.node.live(self.node.append("bob", text, peer="alice"))
        self.node.pump()

    def test_another_device_reading_drops_the_unread_count_at_once(self) -> None:
        """Acceptance 3, the web device's side: 3 unread, then 0 on the phone's READ_N."""
        self.assertEqual(self.client.reads.unread_counts(), {AB: 3})
        notice = cim_pb2.ReadNotice(conversation=AB, reader="alice", seq=3, last_seq=3, peer="bob")
        self.client.frame_received(cim_pb2.READ_N, notice)
        self.assertEqual(self.client.reads.unread(AB), 0)
        self.assertEqual(self.client.reads.unread_counts(), {})
        [event] = self.events
        self.assertEqual((event.own, event.unread, event.peer, event.seq), (True, 0, "bob", 3))
        self.assertEqual(
            event.json_record(),
            {
                "event": "read",
                "conversation": AB,
                "reader": "alice",
                "seq": 3,
                "own": True,
                "unread": 0,
                "peer": "bob",
            },
        )

    def test_mark_read_without_a_seq_marks_up_to_the_newest_it_has(self) -> None:
        d = self.client.mark_read(AB)
        self.node.pump()
        answer = self.successResultOf(d)
        self.assertEqual((answer.seq, answer.moved), (3, True))
        [request] = self.node.of_type(cim_pb2.READ_R)
        self.assertEqual((request.conversation, request.seq), (AB, 3))
        self.assertEqual(self.client.reads.unread(AB), 0)
        part = self.client.mark_read(AB, 2)  # backwards: nothing changes
        self.node.pump()
        self.assertEqual(self.successResultOf(part).moved, False)

    def test_a_mark_past_the_end_is_refused(self) -> None:
        d = self.client.mark_read(AB, 9)
        self.node.pump()
        self.failureResultOf(d, RequestRefused)
        self.assertEqual(self.client.reads.unread(AB), 3)

    def test_nothing_to_mark_is_said_at_once(self) -> None:
        self.failureResultOf(self.client.mark_read("d:alice:nobody"), ValueError)

    def test_the_peer_reading_is_a_read_event_not_an_unread_change(self) -> None:
        sent = self.client.send_text("bob", "mine")
        self.node.pump()
        self.assertEqual(self.successResultOf(sent).status, "stored")  # the fake node says so
        self.assertEqual(self.client.reads.unread(AB), 0)  # answering reads it: own message
        notice = cim_pb2.ReadNotice(conversation=AB, reader="bob", seq=4, peer="bob")
        self.client.frame_received(cim_pb2.READ_N, notice)
        [event] = self.events
        self.assertEqual((event.own, event.reader, event.seq), (False, "bob", 4))
        self.assertEqual(self.client.reads.peer_read(AB), 4)


class ReadersTests(SynchronousTestCase):
    def test_the_sender_asks_who_read_a_group_message(self) -> None:
        node = TimelineNode("alice")
        client, _, _ = session(node)
        node.connect(client)
        node.pump()
        node.readers = ["bob"]
        d = client.readers("g:team", 4)
        node.pump()
        answer = self.successResultOf(d)
        [asked] = node.of_type(cim_pb2.READERS_R)
        self.assertEqual((asked.conversation, asked.seq), ("g:team", 4))
        self.assertEqual((answer.count, list(answer.readers), answer.members), (1, ["bob"], 2))
        node.refusals[cim_pb2.READERS_R] = [
            cim_pb2.Error(code=cim_pb2.Error.FORBIDDEN, message="not yours")
        ]
        refused = client.readers("g:team", 3)
        node.pump()
        self.assertEqual(
            self.failureResultOf(refused, RequestRefused).value.code, cim_pb2.Error.FORBIDDEN
        )


class SummaryTests(SynchronousTestCase):
    def test_the_summary_sets_counts_and_peer_marks(self) -> None:
        reads = ReadState("alice")
        summary = cim_pb2.OfflineSummaryA()
        summary.conversations.add(
            conversation=AB, peer="bob", count=2, last_seq=5, cursor=3, read_seq=3
        )
        summary.caught_up.add(conversation="d:alice:carol", seq=7)
        summary.peer_reads.add(conversation="d:alice:carol", seq=6)
        reads.summary(summary)
        self.assertEqual(reads.unread_counts(), {AB: 2})
        self.assertEqual((reads.newest(AB), reads.where(AB)), (5, ("bob", "")))
        self.assertEqual(reads.peer_read("d:alice:carol"), 6)

    def test_conversation_keys_from_what_a_person_types(self) -> None:
        self.assertEqual(conversation_key("bob", "alice"), AB)
        self.assertEqual(conversation_key("bob", "g1", group=True), "g:g1")
        self.assertEqual(conversation_key("bob", "d:x:y"), "d:x:y")
