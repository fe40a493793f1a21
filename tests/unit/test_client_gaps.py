"""The client library's gaps (#14): a live message after a missing one is held and the
gap filled with HISTORY_R; a fill refused for now hands the gap to the conversation's
catch-up, holding what came; a fill answers only its own range, never the hole an
earlier refusal left (the chaos run's loss, docs/reliability.md); a gap found around a
catch-up waits for its pull.

A ``TimelineNode`` (tests/fakes) answers the session's frames as the design says.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.protocols import cim_pb2
from tests.fakes.timeline_node import TimelineNode, session, texts

_READS = (
    cim_pb2.HISTORY_R,
    cim_pb2.OFFLINE_SUMMARY_R,
    cim_pb2.OFFLINE_R,
    cim_pb2.OFFLINE_ACK_R,
)
"""What a node whose database is down refuses (UNAVAILABLE)."""


class GapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = TimelineNode("bob")
        for text in ("one", "two"):
            self.node.append("alice", text, peer="bob")
        self.node.cursors["d:alice:bob"] = 2  # bob saw both before
        self.client, self.clock, self.shown = session(self.node)
        self.node.connect(self.client)
        self.node.pump()

    def test_the_summary_anchors_and_the_next_live_message_goes_at_once(self) -> None:
        self.assertEqual(self.client.inbox.watermark("d:alice:bob"), 2)
        three = self.node.append("alice", "three", peer="bob")
        self.node.live(three)
        self.assertEqual(texts(self.shown), ["three"])
        self.node.pump()
        [ack] = self.node.of_type(cim_pb2.ACK_R)
        self.assertEqual(
            (ack.msg_id, ack.conversation, ack.through_seq), (three.id, "d:alice:bob", 3)
        )
        self.assertEqual(self.node.cursors["d:alice:bob"], 3)

    def test_a_lost_live_copy_is_fetched_and_both_shown_once_in_order(self) -> None:
        three = self.node.append("alice", "three", peer="bob")  # its live copy is lost
        four = self.node.append("alice", "four", peer="bob")
        self.node.live(four)
        self.assertEqual(self.shown, [], "held: three is missing")
        [asked] = self.node.of_type(cim_pb2.HISTORY_R)
        self.assertEqual((asked.peer, asked.after, asked.before), ("alice", 2, 4))
        self.node.live(four)  # a repeat while held changes nothing
        self.node.pump()
        self.assertEqual(texts(self.shown), ["three", "four"])
        self.node.live(three)  # the late live copy: a duplicate
        self.node.live(four)
        self.node.pump()
        self.assertEqual(texts(self.shown), ["three", "four"])
        self.assertEqual(self.client.inbox.watermark("d:alice:bob"), 4)
        self.assertEqual(self.node.cursors["d:alice:bob"], 4)
        self.assertEqual(self.client.inbox.held(), 0)

    def test_a_resend_the_node_took_anew_is_dropped_and_its_place_dealt_with(self) -> None:
        three = self.node.append("alice", "three", peer="bob")
        three.client_seq = 77
        again = self.node.append("alice", "three", peer="bob")  # past the node's dedup
        again.client_seq = 77
        five = self.node.append("alice", "five", peer="bob")
        for message in (three, again, five):
            self.node.live(message)
        self.node.pump()
        self.assertEqual(texts(self.shown), ["three", "five"])
        self.assertEqual(self.node.of_type(cim_pb2.HISTORY_R), [])
        self.assertEqual(self.node.cursors["d:alice:bob"], 5)

    def test_other_conversations_are_not_held_behind_a_gap(self) -> None:
        self.node.append("alice", "three", peer="bob")
        four = self.node.append("alice", "four", peer="bob")
        self.node.live(four)  # waits for its fill
        other = self.node.append("carol", "hello bob", peer="bob")
        self.node.live(other)
        self.assertEqual(texts(self.shown), ["hello bob"])
        self.node.pump()
        self.assertEqual(texts(self.shown), ["hello bob", "three", "four"])

    def test_a_gap_of_more_than_a_page_is_brought_by_the_catch_up_whole(self) -> None:
        for number in range(3, 10):
            self.node.append("alice", f"m{number}", peer="bob")
        last = self.node.append("alice", "m10", peer="bob")
        self.node.live(last)
        self.node.pump()
        # The node's pages hold 3: the fill finds more than a page missing, and the
        # conversation's catch-up brings all of it, each once, as a catch-up hands
        # pages over (newest page first, each page oldest first; ``ordered`` for one
        # order), then the held one.
        self.assertEqual(texts(self.shown), ["m8", "m9", "m10", "m5", "m6", "m7", "m3", "m4"])
        self.assertEqual(self.client.inbox.watermark("d:alice:bob"), 10)

    def test_a_fill_that_fails_shows_what_came_without_claiming_the_hole(self) -> None:
        three = self.node.append("alice", "three", peer="bob")
        four = self.node.append("alice", "four", peer="bob")
        self.node.refusals[cim_pb2.HISTORY_R] = [cim_pb2.Error(code=cim_pb2.Error.FORBIDDEN)]
        self.node.live(four)
        self.node.pump(rounds=2)  # the refusal, and four shown with its ack
        self.assertEqual(texts(self.shown), ["four"])
        self.assertEqual(self.client.inbox.watermark("d:alice:bob"), 2)
        [ack] = self.node.of_type(cim_pb2.ACK_R)
        self.assertEqual(ack.through_seq, 2)  # never past the message not shown
        # The conversation's catch-up was asked at once: it brings the hole.
        self.node.pump()
        self.assertEqual(texts(self.shown), ["four", three.text])
        self.assertEqual(self.client.inbox.watermark("d:alice:bob"), 4)
        self.assertEqual(self.node.cursors["d:alice:bob"], 4)

    def reads_refused(self) -> None:
        """The node's database is down: every read is refused UNAVAILABLE."""
        for frame_type in _READS:
            self.node.refusals[frame_type] = [
                cim_pb2.Error(code=cim_pb2.Error.UNAVAILABLE) for _ in range(100)
            ]

    def reads_answered(self) -> None:
        for frame_type in _READS:
            self.node.refusals.pop(frame_type, None)

    def test_through_a_short_outage_the_gap_and_what_came_are_shown_in_order(self) -> None:
        # Reads refused for a few seconds (a database restarting): the fill's refusal
        # hands the gap to the conversation's catch-up, which brings it and then what
        # was held, in seq order (not what came first and the hole after it).
        missed = self.node.append("alice", "missed 3", peer="bob")
        came = self.node.append("alice", "came 4", peer="bob")
        for frame_type in (cim_pb2.HISTORY_R, cim_pb2.OFFLINE_R):
            self.node.refusals[frame_type] = [
                cim_pb2.Error(code=cim_pb2.Error.UNAVAILABLE, retry_after_ms=1000) for _ in range(6)
            ]
        self.node.live(came)
        self.settle()
        self.assertEqual(texts(self.shown), [missed.text, came.text])
        self.assertEqual(self.client.inbox.watermark("d:alice:bob"), 4)
        self.assertEqual(self.node.cursors["d:alice:bob"], 4)

    def test_after_a_refused_fill_the_catch_up_brings_the_hole_once_it_can(self) -> None:
        # The chaos run's sequence (a group's copies missed while the bus was down,
        # the fill refused while the database was): shown what came, the cursor kept
        # below the hole through later live messages, the hole brought by the
        # conversation's catch-up (asked at the refusal, retried) once reads work,
        # each once.
        for text in ("g1", "g2"):
            self.node.append("carol", text, group="team")
        self.node.cursors["g:team"] = 2
        self.client.catch_up.start()  # the summary anchors the group at 2
        self.node.pump()
        self.assertEqual(self.client.inbox.watermark("g:team"), 2)
        self.shown.clear()
        missed = [self.node.append("carol", f"missed {n}", group="team") for n in (3, 4)]
        came = self.node.append("dave", "came", group="team")
        self.reads_refused()
        self.node.live(came)
        self.settle()
        self.assertEqual(texts(self.shown), ["came"])  # shown what came
        later = self.node.append("dave", "later", group="team")
        self.node.live(later)
        self.settle()
        self.assertEqual(texts(self.shown), ["came", "later"])
        self.assertLessEqual(self.node.cursors["g:team"], 2)
        self.assertTrue(self.node.of_type(cim_pb2.OFFLINE_R), "the catch-up was asked")
        self.reads_answered()
        self.settle()
        self.assertEqual(texts(self.shown)[:2], ["came", "later"])
        # Catch-up pages come newest first (``ordered=False``): the hole's two in any order.
        self.assertEqual(sorted(texts(self.shown)[2:]), [m.text for m in missed])
        self.assertEqual(self.node.cursors["g:team"], 6)

    def test_a_later_fill_does_not_skip_the_hole_a_refused_one_left(self) -> None:
        # The chaos loss: a fill refused while the database was down leaves a hole below
        # what was shown; a later gap's fill, answered once the database is back, brings
        # its own range only. The watermark must stay below the first hole (it jumped
        # to the second fill's end, and the cursor with it, so no catch-up brought it).
        for text in ("g1", "g2"):
            self.node.append("carol", text, group="team")
        self.node.cursors["g:team"] = 2
        self.client.catch_up.start()
        self.node.pump()
        self.shown.clear()
        missed = self.node.append("carol", "missed 3", group="team")
        came = self.node.append("dave", "came 4", group="team")
        self.reads_refused()
        self.node.live(came)
        self.settle()  # refused past MAX_REFUSED_ROUNDS: what came is shown
        self.assertEqual(texts(self.shown), ["came 4"])
        # The catch-up asked for the hole gives up too, the outage outlasting its
        # retries; the next gap's fill is answered once the node reads again.
        for _ in range(60):
            self.node.pump()
            self.clock.advance(10)
        self.assertFalse(self.client.catch_up.running)
        self.reads_answered()
        self.node.append("dave", "skipped live 5", group="team")
        after = self.node.append("dave", "after 6", group="team")
        self.node.live(after)  # 5's live copy was missed: a gap, filled this time
        self.node.pump(rounds=2)  # the fill's answer, and the acks of what it showed
        self.assertEqual(texts(self.shown), ["came 4", "skipped live 5", "after 6"])
        self.assertEqual(self.client.inbox.watermark("g:team"), 2)
        self.assertLessEqual(self.node.cursors["g:team"], 2)
        self.assertTrue(all(a.through_seq <= 2 for a in self.node.of_type(cim_pb2.ACK_R)))
        self.client.catch_up.start()  # the next catch-up brings the hole
        self.settle()
        self.assertEqual(texts(self.shown), ["came 4", "skipped live 5", "after 6", missed.text])
        self.assertEqual(self.client.inbox.watermark("g:team"), after.seq)
        self.assertEqual(self.node.cursors["g:team"], after.seq)

    def test_an_own_message_held_through_a_refused_fill_is_not_shown_back(self) -> None:
        # msg:A of this device's own message comes while a fill is out: its place is
        # held; the fill is refused, and the catch-up brings the hole and the page
        # around it, the own message included: dealt with, never handed over.
        missed = self.node.append("alice", "missed 3", peer="bob")
        came = self.node.append("alice", "came 4", peer="bob")
        self.reads_refused()
        self.node.live(came)
        sent = self.client.send_text("alice", "mine 5")
        self.settle()
        self.assertEqual(self.successResultOf(sent).status, "stored")
        self.assertEqual(texts(self.shown), ["came 4"])
        self.reads_answered()
        self.settle()
        self.assertEqual(texts(self.shown), ["came 4", missed.text])
        self.assertEqual(self.client.inbox.watermark("d:alice:bob"), 5)
        self.assertEqual(self.node.cursors["d:alice:bob"], 5)

    def settle(self) -> None:
        """Answer, and let every retry and delayed ack come, until nothing is asked."""
        for _ in range(40):
            self.node.pump()
            self.clock.advance(1)
        self.node.pump()

    def test_own_messages_keep_the_watermark_contiguous(self) -> None:
        sent = self.client.send_text("alice", "mine")
        self.node.pump()
        self.assertEqual(self.successResultOf(sent).status, "stored")
        self.assertEqual(self.client.inbox.watermark("d:alice:bob"), 3)
        reply = self.node.append("alice", "reply", peer="bob")
        self.node.live(reply)
        self.assertEqual(texts(self.shown), ["reply"])
        self.assertEqual(self.node.of_type(cim_pb2.HISTORY_R), [])

    def test_a_declined_message_stops_the_cursor_below_it(self) -> None:
        self.client.on_message = lambda message: message.text != "three"
        three = self.node.append("alice", "three", peer="bob")
        four = self.node.append("alice", "four", peer="bob")
        self.node.live(three)
        self.node.live(four)
        self.node.pump()
        self.assertEqual([a.through_seq for a in self.node.of_type(cim_pb2.ACK_R)], [0])
        self.assertEqual(self.node.cursors["d:alice:bob"], 2)


class GapDuringCatchUpTests(SynchronousTestCase):
    """A gap found around a catch-up of its conversation: the pull brings the missing
    messages, in order. A gap fill of more than a page used to hand its newest page over
    and move the watermark past the rest; done while a pull was coming, it made the
    pull drop that rest as already shown (found by tests/integration/test_group_flood_kill.py:
    a member reconnecting after kill -9 under a group flood never showed 355 posts)."""

    def test_a_gap_seen_before_the_summary_answers_waits_for_the_pull(self) -> None:
        node = TimelineNode("bob", page=3)
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        node.pump()
        node.live(node.append("alice", "m1", peer="bob"))
        node.pump()
        client.connection_closed(Failure(ConnectionError("the node was killed")))
        for number in range(2, 10):  # written while bob was away: no live copies
            node.append("alice", f"m{number}", peer="bob")
        last = node.append("alice", "m10", peer="bob")
        node.connect(client)  # the summary is asked
        node.live(last)  # a live copy before its answer: 2..9 missing
        self.assertEqual(node.of_type(cim_pb2.HISTORY_R), [], "the summary will say")
        node.pump()
        self.assertEqual(texts(shown), [f"m{n}" for n in range(1, 11)])
        self.assertEqual(node.cursors["d:alice:bob"], 10)
        self.assertEqual(client.inbox.held(), 0)

    def test_a_fill_answered_during_the_pull_leaves_the_range_to_it(self) -> None:
        node = TimelineNode("bob", page=3)
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        node.pump()
        for number in range(1, 10):
            node.append("alice", f"m{number}", peer="bob")
        last = node.append("alice", "m10", peer="bob")
        node.live(last)  # 1..9 missing: their fill is asked
        [fill] = node.of_type(cim_pb2.HISTORY_R)
        self.assertEqual((fill.after, fill.before), (0, 10))
        notice = cim_pb2.OfflineNotice(conversation=last.conversation, seq=10)
        client.frame_received(cim_pb2.OFFLINE_NOTICE, notice)  # and the pull begins
        node.pump()
        self.assertEqual(texts(shown), [f"m{n}" for n in range(1, 11)])
        self.assertEqual(node.cursors["d:alice:bob"], 10)
        self.assertEqual(client.inbox.held(), 0)

    def test_a_fill_refused_during_the_pull_leaves_the_range_to_it(self) -> None:
        node = TimelineNode("bob", page=3)
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        node.pump()
        for number in range(1, 3):
            node.append("alice", f"m{number}", peer="bob")
        last = node.append("alice", "m3", peer="bob")
        node.refusals[cim_pb2.HISTORY_R] = [cim_pb2.Error(code=cim_pb2.Error.FORBIDDEN)]
        node.live(last)
        notice = cim_pb2.OfflineNotice(conversation=last.conversation, seq=3)
        client.frame_received(cim_pb2.OFFLINE_NOTICE, notice)
        node.pump()
        self.assertEqual(texts(shown), ["m1", "m2", "m3"], "m3 not shown before the pull's")
