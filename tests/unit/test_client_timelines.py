"""The client library on timelines (#14): the summary anchors each conversation, live
messages go in seq order with gaps filled by HISTORY_R, catch-up hands the newest page
of the newest conversation first, requests have deadlines and retries, ERROR frames
end their waits at once, and msg:R refused UNAVAILABLE goes again soon, in order. Gaps
and their fills are in ``test_client_gaps``.

A ``TimelineNode`` (tests/fakes) answers the session's frames as the design says.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.client.answers import RequestPolicy, RequestRefused, RequestTimedOut
from cim.client.catch_up import CatchUpResult
from cim.protocols import cim_pb2
from tests.fakes.timeline_node import TimelineNode, session, texts


class NewConversationTests(SynchronousTestCase):
    def test_after_a_complete_summary_a_new_conversation_starts_at_its_beginning(self) -> None:
        node = TimelineNode("bob")
        client, _, shown = session(node)
        node.connect(client)
        node.pump()
        first = node.append("dave", "first", peer="bob")
        second = node.append("dave", "second", peer="bob")
        node.live(second)  # the first live copy was lost
        node.pump()
        self.assertEqual(texts(shown), ["first", "second"])
        del first
        # A group joined after the summary: pulled, as the node knows where the member
        # starts (its floor, here 5: the five messages from before bob joined).
        for number in range(5):
            node.append("carol", f"old {number}", group="g9")
        node.cursors["g:g9"] = 5
        joined = node.append("carol", "after joining", group="g9")
        later = node.append("dave", "and later", group="g9")
        node.live(later)  # the live copies cross: the later one first
        node.live(joined)
        self.assertEqual(texts(shown), ["first", "second"], "both wait for the pull")
        [pull] = node.of_type(cim_pb2.OFFLINE_R)
        self.assertEqual(pull.conversation, "g:g9")
        node.pump()
        self.assertEqual(texts(shown), ["first", "second", "after joining", "and later"])
        self.assertEqual(node.cursors["g:g9"], 7)
        self.assertEqual([h for h in node.of_type(cim_pb2.HISTORY_R) if h.group], [])

    def test_my_first_message_to_someone_new_is_not_shown_back_to_me(self) -> None:
        node = TimelineNode("bob")
        client, _, shown = session(node)
        node.connect(client)
        node.pump()
        client.send_text("erin", "hi erin")
        node.pump()
        reply = node.append("erin", "hi bob", peer="bob")
        node.live(reply)
        self.assertEqual(texts(shown), ["hi bob"])
        self.assertEqual(node.of_type(cim_pb2.HISTORY_R), [])

    def test_before_the_summary_answers_live_messages_wait_for_it(self) -> None:
        node = TimelineNode("bob")
        node.append("alice", "one", peer="bob")  # unread from before the login
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        two = node.append("alice", "two", peer="bob")
        node.live(two)  # the summary is still unanswered: where is bob in this one?
        self.assertEqual(shown, [])
        node.pump()
        self.assertEqual(texts(shown), ["one", "two"], "in order, each once")
        self.assertEqual(node.cursors["d:alice:bob"], 2)

    def test_without_a_summary_live_messages_go_at_once(self) -> None:
        node = TimelineNode("bob")
        node.append("alice", "one", peer="bob")
        node.cursors["d:alice:bob"] = 1
        refused = cim_pb2.Error(code=cim_pb2.Error.FORBIDDEN, message="no summary for you")
        node.refusals[cim_pb2.OFFLINE_SUMMARY_R] = [refused]
        client, _, shown = session(node)
        node.connect(client)
        two = node.append("alice", "two", peer="bob")
        node.live(two)
        self.assertEqual(shown, [])
        node.pump()  # the refusal: nothing will say where bob starts
        self.assertEqual(texts(shown), ["two"])
        [ack] = node.of_type(cim_pb2.ACK_R)
        self.assertEqual(ack.through_seq, 0)  # moves no cursor it cannot vouch for
        three = node.append("alice", "three", peer="bob")
        node.live(three)
        self.assertEqual(texts(shown), ["two", "three"])


class CatchUpTests(SynchronousTestCase):
    def fill(self, node: TimelineNode) -> None:
        for number in range(1, 8):  # alice: 7 unread, older activity
            node.append("alice", f"a{number}", peer="bob")
        for number in range(1, 3):  # carol: 2 unread, the newest activity
            node.append("carol", f"c{number}", peer="bob")

    def test_the_newest_page_of_the_newest_conversation_comes_first(self) -> None:
        node = TimelineNode("bob", page=3)
        self.fill(node)
        client, _, shown = session(node)
        node.connect(client)
        node.pump(rounds=1)  # the summary only
        self.assertEqual(shown, [])
        [pull] = node.of_type(cim_pb2.OFFLINE_R)
        self.assertEqual((pull.conversation, pull.before), ("d:bob:carol", 0))
        node.pump(rounds=1)
        self.assertEqual(texts(shown), ["c1", "c2"], "before alice's pages are asked")
        node.pump(rounds=1)  # alice's newest page, handed before the older ones come
        self.assertEqual(texts(shown)[2:], ["a5", "a6", "a7"])
        node.pump()
        self.assertEqual(texts(shown), ["c1", "c2", "a5", "a6", "a7", "a2", "a3", "a4", "a1"])
        self.assertEqual(node.cursors, {"d:alice:bob": 7, "d:bob:carol": 2})
        # carol's cursor went with alice's first pull; the pull ended with OFFLINE_ACK_R.
        pulls = node.of_type(cim_pb2.OFFLINE_R)
        self.assertEqual(
            [list(p.acks) for p in pulls][1], [cim_pb2.Cursor(conversation="d:bob:carol", seq=2)]
        )
        [end] = node.of_type(cim_pb2.OFFLINE_ACK_R)
        self.assertEqual(list(end.cursors), [cim_pb2.Cursor(conversation="d:alice:bob", seq=7)])

    def test_ordered_hands_each_conversation_oldest_first(self) -> None:
        node = TimelineNode("bob", page=3)
        self.fill(node)
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        node.pump()
        self.assertEqual(texts(shown), ["c1", "c2", *(f"a{n}" for n in range(1, 8))])

    def test_a_live_message_during_the_pull_waits_for_its_own_conversation_only(self) -> None:
        node = TimelineNode("bob", page=3)
        self.fill(node)
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        node.pump(rounds=1)  # the summary
        a8 = node.append("alice", "a8", peer="bob")
        node.live(a8)  # alice is being caught up: after her unread ones
        dave = node.append("dave", "hi", peer="bob")
        node.live(dave)
        self.assertEqual(texts(shown), ["hi"])
        node.pump()
        self.assertEqual(texts(shown)[-1], "a8")
        self.assertEqual(texts(shown).count("a8"), 1)
        self.assertEqual(node.of_type(cim_pb2.HISTORY_R), [], "the pull filled it")

    def test_one_conversation_on_request(self) -> None:
        node = TimelineNode("bob", page=3)
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        node.pump()  # the login's catch-up: nothing yet
        self.fill(node)  # then, without live copies (another node appended them)
        done = client.catch_up.start("d:bob:carol")
        node.pump()
        result: CatchUpResult = self.successResultOf(done)
        self.assertEqual((result.handed, result.conversations), (2, ["d:bob:carol"]))
        self.assertEqual(texts(shown), ["c1", "c2"])
        self.assertEqual(node.cursors, {"d:alice:bob": 0, "d:bob:carol": 2})
        everything = client.catch_up.start()
        node.pump()
        self.assertEqual(self.successResultOf(everything).handed, 7)
        self.assertEqual(texts(shown)[2:], [f"a{n}" for n in range(1, 8)])

    def test_a_client_that_takes_nothing_asks_nothing_and_moves_no_cursor(self) -> None:
        node = TimelineNode("bob")
        self.fill(node)
        client, _, shown = session(node, receiving=False)
        node.connect(client)
        node.pump()
        node.live(node.append("alice", "live", peer="bob"))
        sent = client.send_text("alice", "mine")
        node.pump()
        self.assertEqual(self.successResultOf(sent).status, "stored")
        self.assertEqual(shown, [])
        kinds = {kind for kind, _ in node.sent}
        self.assertEqual(kinds, {cim_pb2.MSG_R})
        self.assertEqual(node.cursors, {"d:alice:bob": 0, "d:bob:carol": 0})

    def test_duplicates_across_a_reconnect_are_shown_once(self) -> None:
        node = TimelineNode("bob", page=3)
        self.fill(node)
        client, _, shown = session(node, ordered=True)
        node.swallow = {cim_pb2.OFFLINE_ACK_R, cim_pb2.ACK_R}  # the cursors never arrive
        node.connect(client)
        node.pump()
        live = node.append("alice", "a8", peer="bob")
        node.live(live)
        self.assertEqual(len(shown), 10)
        node.cursors = {"d:alice:bob": 2, "d:bob:carol": 0}  # only the first pull's acks
        client.connection_closed(Failure(ConnectionError("cut")))
        node.swallow = set()
        pulls = len(node.of_type(cim_pb2.OFFLINE_R))
        node.connect(client)
        node.live(live)  # the node sends the unacknowledged live copy again
        node.pump()
        self.assertEqual(len(shown), 10)
        # Everything was shown before: the cursors move without pulling again.
        self.assertEqual(len(node.of_type(cim_pb2.OFFLINE_R)), pulls)
        self.assertEqual(sorted(texts(shown)), sorted({*texts(shown)}))
        self.assertEqual(node.cursors, {"d:alice:bob": 8, "d:bob:carol": 2})

    def test_an_offline_notice_pulls_that_conversation(self) -> None:
        node = TimelineNode("bob", page=3)
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        node.pump()
        stored = node.append("alice", "while over budget", peer="bob")
        client.frame_received(
            cim_pb2.OFFLINE_NOTICE, cim_pb2.OfflineNotice(conversation=stored.conversation, seq=1)
        )
        node.pump()
        self.assertEqual(texts(shown), ["while over budget"])
        self.assertEqual(node.cursors[stored.conversation], 1)


class RequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = TimelineNode("bob")
        policy = RequestPolicy(deadline=5.0, attempts=3)
        self.client, self.clock, self.shown = session(self.node, requests=policy)
        self.node.connect(self.client)
        self.node.pump()
        self.node.sent.clear()

    def test_a_request_without_an_answer_goes_again_with_backoff_then_fails(self) -> None:
        self.node.swallow = {cim_pb2.ONLINE_R}
        asked = self.client.online()
        self.clock.advance(5.0)
        self.assertEqual(len(self.node.of_type(cim_pb2.ONLINE_R)), 1, "not before the backoff")
        self.clock.advance(0.5)
        self.assertEqual(len(self.node.of_type(cim_pb2.ONLINE_R)), 2)
        self.assertNoResult(asked)
        self.clock.advance(5.0)  # the second deadline; the next wait is longer (0.5-1 s)
        self.clock.advance(0.49)
        self.assertEqual(len(self.node.of_type(cim_pb2.ONLINE_R)), 2)
        self.clock.advance(0.51)
        self.assertEqual(len(self.node.of_type(cim_pb2.ONLINE_R)), 3)
        self.clock.advance(4.9)
        self.assertNoResult(asked)
        self.clock.advance(0.1)
        self.failureResultOf(asked, RequestTimedOut)
        self.clock.advance(60)
        self.assertEqual(len(self.node.of_type(cim_pb2.ONLINE_R)), 3)

    def test_a_late_answer_after_a_retry_still_ends_it(self) -> None:
        self.node.swallow = {cim_pb2.OFFLINE_SUMMARY_R}
        asked = self.client.offline_summary()
        self.clock.advance(5.0)
        self.clock.advance(0.5)
        self.node.swallow = set()
        [first, second] = self.node.of_type(cim_pb2.OFFLINE_SUMMARY_R)
        self.assertEqual(first.request_id, second.request_id)
        self.node.queue.append((self.node.connection, cim_pb2.OFFLINE_SUMMARY_R, second))  # type: ignore[arg-type]
        self.node.pump()
        self.assertEqual(self.successResultOf(asked).total, 0)
        self.clock.advance(60)
        self.assertEqual(len(self.node.of_type(cim_pb2.OFFLINE_SUMMARY_R)), 2)

    def test_error_frames_end_the_waits_of_summary_pull_and_online_at_once(self) -> None:
        forbidden = cim_pb2.Error.BAD_REQUEST
        for frame_type in (cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OFFLINE_R, cim_pb2.ONLINE_R):
            self.node.refusals[frame_type] = [cim_pb2.Error(code=forbidden, message="no")]
        summary = self.client.offline_summary()
        pull = self.client.answers.ask(cim_pb2.OFFLINE_R, cim_pb2.OfflineR(conversation="d:x"))
        online = self.client.online()
        self.node.pump()
        for asked in (summary, pull, online):
            failure = self.failureResultOf(asked, RequestRefused)
            self.assertIn("BAD_REQUEST: no", failure.getErrorMessage())
        self.assertEqual(len(self.client.answers), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [], "no deadline or retry is left")

    def test_unavailable_is_retried_after_the_nodes_wait(self) -> None:
        busy = cim_pb2.Error(code=cim_pb2.Error.UNAVAILABLE, retry_after_ms=2000)
        self.node.refusals[cim_pb2.HISTORY_R] = [busy]
        asked = self.client.history("alice")
        self.node.pump()
        self.assertNoResult(asked)
        self.clock.advance(1.9)
        self.assertEqual(len(self.node.of_type(cim_pb2.HISTORY_R)), 1)
        self.clock.advance(0.1)
        self.node.pump()
        self.assertEqual(len(self.node.of_type(cim_pb2.HISTORY_R)), 2)
        self.assertEqual(self.successResultOf(asked).error, "")

    def test_creating_a_group_is_not_repeated_after_its_deadline(self) -> None:
        self.node.swallow = {cim_pb2.GROUP_R}
        create = cim_pb2.GroupRequest(create=cim_pb2.CreateGroup(name="team"))
        asked = self.client.group_request(create)
        listed = self.client.group_request(cim_pb2.GroupRequest(list=cim_pb2.ListGroups()))
        self.clock.advance(5.0)
        self.failureResultOf(asked, RequestTimedOut)
        self.clock.advance(1.0)
        creates = [r for r in self.node.of_type(cim_pb2.GROUP_R) if r.HasField("create")]
        self.assertEqual(len(creates), 1)
        lists = [r for r in self.node.of_type(cim_pb2.GROUP_R) if r.HasField("list")]
        self.assertEqual(len(lists), 2)
        self.assertNoResult(listed)


class UnavailableSendTests(SynchronousTestCase):
    def test_refused_messages_go_again_soon_in_the_users_order(self) -> None:
        node = TimelineNode("bob")
        client, clock, _ = session(node)
        node.connect(client)
        node.pump()
        down = [cim_pb2.Error(code=cim_pb2.Error.UNAVAILABLE) for _ in range(3)]
        node.refusals[cim_pb2.MSG_R] = down
        outcomes = [client.send_text("alice", text) for text in ("first", "second", "third")]
        node.pump()
        self.assertEqual(len(node.of_type(cim_pb2.MSG_R)), 3)
        clock.advance(0.2)  # the short backoff, far below the 10 s resend
        node.pump()
        clock.advance(0)
        node.pump()
        sent = [m.text for m in node.of_type(cim_pb2.MSG_R)]
        self.assertEqual(sent, ["first", "second", "third", "first", "second", "third"])
        self.assertEqual([self.successResultOf(o).status for o in outcomes], ["stored"] * 3)
        self.assertEqual(
            [m.text for m in node.timelines["d:alice:bob"]], ["first", "second", "third"]
        )


class ConnectionLossTests(SynchronousTestCase):
    def test_a_gap_cut_by_a_lost_connection_is_healed_by_the_next_catch_up(self) -> None:
        node = TimelineNode("bob")
        client, _, shown = session(node)
        node.connect(client)
        node.pump()
        one, two, three = (node.append("alice", str(n), peer="bob") for n in (1, 2, 3))
        node.swallow = {cim_pb2.HISTORY_R}
        node.live(one)
        node.live(three)  # two's live copy is lost; its fill is asked
        node.pump()  # the ack of one is answered, the fill never is
        client.connection_closed(Failure(ConnectionError("cut")))
        self.assertEqual(texts(shown), ["1"], "three waits: shown after two, not before")
        node.swallow = set()
        node.connect(client)
        node.pump()
        self.assertEqual(texts(shown), ["1", "2", "3"])
        self.assertEqual(node.cursors["d:alice:bob"], 3)
        self.assertEqual(two.seq, 2)


class OwnMessagesAfterAKillTests(SynchronousTestCase):
    def test_a_post_written_before_the_node_died_is_not_handed_back_to_its_device(
        self,
    ) -> None:
        """The node wrote the post and died before its msg:A: after the reconnect the
        pull brings the post before the resend's msg:A says it is this device's own
        (found by tests/integration/test_group_flood_kill.py: the flooder's application
        was handed 54 of its own posts)."""
        node = TimelineNode("bob", page=3)
        client, _, shown = session(node, ordered=True)
        node.connect(client)
        node.pump()
        sent = client.send_group("team", "mine")
        [(_, frame_type, request)] = node.queue
        node.queue.clear()
        node.answer(frame_type, request)  # written; the answer dies with the node
        client.connection_closed(Failure(ConnectionError("the node was killed")))
        node.append("alice", "theirs", group="team")
        node.swallow = {cim_pb2.MSG_R}  # the resend is answered after the pull
        node.connect(client)
        node.pump()
        self.assertEqual(texts(shown), ["theirs"])
        self.assertEqual(node.cursors["g:team"], 2)
        self.assertNoResult(sent)


class CatchUpRetryTests(SynchronousTestCase):
    def test_a_catch_up_the_node_does_not_answer_is_started_again_later(self) -> None:
        node = TimelineNode("bob")
        node.append("alice", "waiting", peer="bob")
        policy = RequestPolicy(deadline=5.0, attempts=1)
        client, clock, shown = session(node, requests=policy)
        node.swallow = {cim_pb2.OFFLINE_SUMMARY_R}  # a node too busy to answer
        node.connect(client)
        clock.advance(5.0)  # the summary's only attempt passes: this catch-up fails
        self.assertFalse(client.catch_up.running)
        node.swallow = set()
        clock.advance(0.99)
        self.assertEqual(len(node.of_type(cim_pb2.OFFLINE_SUMMARY_R)), 1)
        clock.advance(1.01)  # RETRY_BACKOFF: 1-2 s the first time
        node.pump()
        self.assertEqual(len(node.of_type(cim_pb2.OFFLINE_SUMMARY_R)), 2)
        self.assertEqual(texts(shown), ["waiting"])
        self.assertEqual(node.cursors["d:alice:bob"], 1)

    def test_a_lost_connection_is_not_retried_and_stop_cancels_a_retry(self) -> None:
        node = TimelineNode("bob")
        policy = RequestPolicy(deadline=5.0, attempts=1)
        client, clock, _ = session(node, requests=policy)
        node.swallow = {cim_pb2.OFFLINE_SUMMARY_R}
        node.connect(client)
        client.connection_closed(Failure(ConnectionError("cut")))
        clock.advance(60)
        self.assertEqual(len(node.of_type(cim_pb2.OFFLINE_SUMMARY_R)), 1)
        node.connect(client)  # the next login's catch-up, again unanswered
        clock.advance(5.0)
        self.successResultOf(Deferred.fromCoroutine(client.stop(logout=False)))
        clock.advance(60)
        self.assertEqual(len(node.of_type(cim_pb2.OFFLINE_SUMMARY_R)), 2)
