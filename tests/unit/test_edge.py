"""The edge (issue #16, "Ids and numbers"): numbers past the stores' range never reach
them, the client is answered BAD_REQUEST instead of a traceback, and a client that
keeps doing it is cut off without flooding the log."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from cim.im.edge import STORE_MAX, out_of_range, refusal
from cim.loglimit import LogLimit
from cim.protocols import cim_pb2
from cim.protocols.im import ConnectionState
from tests.fakes.node import ConnectedClient, NodeHarness

HUGE = 2**63
BAD_REQUEST = cim_pb2.Error.BAD_REQUEST


def _future_frame_classes() -> tuple[Any, Any]:
    """A message type cim.proto does not have (yet): nested cursors, a map, other ints.

    Like the catch-up frames another branch adds (OfflineR.acks of Cursor), it proves
    the edge covers fields it was never told about.
    """
    file = descriptor_pb2.FileDescriptorProto(name="edge_future.proto", package="edge.test")
    file.syntax = "proto3"
    cursor = file.message_type.add(name="Cursor")
    cursor.field.add(name="conversation", number=1, type=9, label=1)  # string
    cursor.field.add(name="seq", number=2, type=4, label=1)  # uint64
    future = file.message_type.add(name="Future")
    future.field.add(name="acks", number=1, type=11, label=3, type_name=".edge.test.Cursor")
    future.field.add(name="through", number=2, type=6, label=1)  # fixed64
    future.field.add(name="delta", number=3, type=18, label=1)  # sint64
    future.field.add(
        name="marks", number=4, type=11, label=3, type_name=".edge.test.Future.MarksEntry"
    )
    entry = future.nested_type.add(name="MarksEntry")
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=4, label=1)
    entry.options.map_entry = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("edge.test.Future")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("edge.test.Cursor")),
    )


Future, Cursor = _future_frame_classes()


class OutOfRangeTests(SynchronousTestCase):
    def test_in_range_frames_pass(self) -> None:
        for message in (
            cim_pb2.Message(id=STORE_MAX, client_seq=1, to="bob", text="hi", type=cim_pb2.IMAGE),
            cim_pb2.OfflineR(
                acks=[cim_pb2.Cursor(conversation="d:a:b", seq=STORE_MAX)],
                before=STORE_MAX,
                limit=2**32 - 1,
                request_id=STORE_MAX,
            ),
            cim_pb2.AckR(msg_id=STORE_MAX),
            cim_pb2.HistoryR(peer="bob", before=STORE_MAX),
            cim_pb2.GroupRequest(request_id=STORE_MAX, create=cim_pb2.CreateGroup(name="x")),
            cim_pb2.OfflineSummaryR(),
            cim_pb2.Message(location=cim_pb2.Location(lat=1e308, name="x")),
        ):
            self.assertIsNone(out_of_range(message), message)

    def test_each_wide_field_past_the_bound(self) -> None:
        cases = [
            (cim_pb2.AckR(msg_id=HUGE), "msg_id"),
            (
                cim_pb2.OfflineAckR(
                    cursors=[
                        cim_pb2.Cursor(conversation="d:a:b", seq=5),
                        cim_pb2.Cursor(conversation="d:a:c", seq=HUGE),
                    ]
                ),
                "cursors[1].seq",
            ),
            (cim_pb2.OfflineR(before=2**64 - 1), "before"),
            (cim_pb2.OfflineR(acks=[cim_pb2.Cursor(seq=HUGE)]), "acks[0].seq"),
            (cim_pb2.AckR(msg_id=1, through_seq=HUGE), "through_seq"),
            (cim_pb2.HistoryR(peer="bob", after=HUGE), "after"),
            (cim_pb2.HistoryR(peer="bob", before=HUGE), "before"),
            (cim_pb2.Message(to="bob", client_seq=HUGE), "client_seq"),
            (cim_pb2.Message(to="bob", prev_seq=HUGE), "prev_seq"),
            (cim_pb2.Message(to="bob", media=cim_pb2.Media(size=HUGE)), "media.size"),
            (cim_pb2.GroupRequest(request_id=HUGE), "request_id"),
        ]
        for message, path in cases:
            problem = out_of_range(message)
            self.assertEqual(problem, f"{path} is out of range (0 to {STORE_MAX})")

    def test_unknown_enum_value(self) -> None:
        message = cim_pb2.Message.FromString(cim_pb2.Message(to="bob").SerializeToString())
        message.type = 99  # type: ignore[assignment]
        self.assertEqual(out_of_range(message), "type is not a known MessageType value")

    def test_fields_the_edge_was_never_told_about(self) -> None:
        self.assertIsNone(
            out_of_range(Future(acks=[Cursor(seq=STORE_MAX)], through=STORE_MAX, delta=-(2**63)))
        )
        self.assertEqual(
            out_of_range(Future(acks=[Cursor(seq=1), Cursor(seq=HUGE)])),
            f"acks[1].seq is out of range (0 to {STORE_MAX})",
        )
        self.assertEqual(
            out_of_range(Future(through=2**64 - 1)),
            f"through is out of range (0 to {STORE_MAX})",
        )
        marks = Future()
        marks.marks["a"] = 1
        marks.marks["b"] = HUGE
        self.assertEqual(out_of_range(marks), f"marks is out of range (0 to {STORE_MAX})")

    def test_the_message_names_no_content(self) -> None:
        problem = out_of_range(cim_pb2.Message(to="bob", text="secret text", client_seq=HUGE))
        assert problem is not None
        self.assertNotIn("secret", problem)
        self.assertNotIn("bob", problem)

    def test_refusals(self) -> None:
        kind, answer = refusal(cim_pb2.MSG_R, cim_pb2.Message(client_seq=7), "p")
        self.assertEqual(kind, cim_pb2.ERROR)
        self.assertEqual(
            (answer.code, answer.request_type, answer.client_seq, answer.message),  # type: ignore[attr-defined]
            (BAD_REQUEST, cim_pb2.MSG_R, 7, "p"),
        )
        kind, answer = refusal(cim_pb2.GROUP_R, cim_pb2.GroupRequest(request_id=HUGE), "p")
        self.assertEqual(kind, cim_pb2.GROUP_A)
        self.assertEqual(
            (answer.request_id, answer.ok, answer.error),  # type: ignore[attr-defined]
            (HUGE, False, "bad_request"),
        )
        kind, answer = refusal(cim_pb2.CONTACTS_R, cim_pb2.ContactsRequest(request_id=3), "p")
        self.assertEqual((kind, answer.request_id), (cim_pb2.CONTACTS_A, 3))  # type: ignore[attr-defined]
        kind, answer = refusal(cim_pb2.HISTORY_R, cim_pb2.HistoryR(), "p")
        self.assertEqual((kind, answer.error), (cim_pb2.HISTORY_A, "bad_request"))  # type: ignore[attr-defined]


class LogLimitTests(SynchronousTestCase):
    def test_one_line_per_key_per_period(self) -> None:
        clock = Clock()
        limit = LogLimit(clock, period=60)
        self.assertTrue(limit.allow("a"))
        self.assertEqual(limit.held_back("a"), 0)
        for _ in range(10):
            self.assertFalse(limit.allow("a"))
        self.assertTrue(limit.allow("b"))
        clock.advance(59.9)
        self.assertFalse(limit.allow("a"))
        clock.advance(0.1)
        self.assertTrue(limit.allow("a"))
        self.assertEqual(limit.held_back("a"), 11)
        self.assertEqual(limit.held_back("a"), 0)

    def test_memory_is_bounded(self) -> None:
        clock = Clock()
        limit = LogLimit(clock, period=60, max_keys=100)
        for n in range(1000):
            limit.allow(n)
        self.assertEqual(len(limit), 100)
        self.assertEqual(limit.dropped, 900)
        clock.advance(60)
        self.assertTrue(limit.allow("new"))
        self.assertEqual(len(limit), 1)

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, LogLimit, Clock(), 0)
        self.assertRaises(ValueError, LogLimit, Clock(), 60, 0)


class NodeEdgeTests(SynchronousTestCase):
    """A node with real timelines on SQLite: 2^63 would overflow its driver."""

    def setUp(self) -> None:
        self.node = NodeHarness("max_bad_frames = 100\n", users=("alice", "bob"))
        self.alice = self.node.connect("alice")
        self.alice.flush()
        self.lines: list[str] = []

        def observe(event: LogEvent) -> None:
            if event.get("log_namespace", "").startswith("cim.protocols"):
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def send(self, client: ConnectedClient, frame_type: int, message: Any) -> None:
        client.protocol.send(frame_type, message)
        client.flush()

    def errors(self) -> list[Any]:
        return self.alice.events.of_type(cim_pb2.ERROR)

    def test_the_store_would_overflow_without_the_edge(self) -> None:
        """What the edge prevents: the driver's OverflowError for 2^63."""
        timelines = self.node.timelines
        failure = self.failureResultOf(timelines.unread_page("alice", "phone", "", HUGE, 10, 65536))
        self.assertTrue(failure.check(OverflowError), failure)

    def test_huge_ids_are_bad_requests_not_tracebacks(self) -> None:
        cases = [
            (
                cim_pb2.OFFLINE_ACK_R,
                cim_pb2.OfflineAckR(
                    cursors=[
                        cim_pb2.Cursor(conversation="d:alice:bob", seq=1),
                        cim_pb2.Cursor(conversation="d:alice:bob", seq=HUGE),
                    ]
                ),
            ),
            (
                cim_pb2.OFFLINE_R,
                cim_pb2.OfflineR(acks=[cim_pb2.Cursor(conversation="d:alice:bob", seq=HUGE)]),
            ),
            (cim_pb2.OFFLINE_R, cim_pb2.OfflineR(before=HUGE)),
            (cim_pb2.ACK_R, cim_pb2.AckR(msg_id=HUGE)),
            (cim_pb2.ACK_R, cim_pb2.AckR(msg_id=1, conversation="d:alice:bob", through_seq=HUGE)),
            (cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=HUGE)),
        ]
        for frame_type, message in cases:
            self.send(self.alice, frame_type, message)
        errors = self.errors()
        self.assertEqual(
            [(e.code, e.request_type) for e in errors],
            [(BAD_REQUEST, frame_type) for frame_type, _ in cases],
        )
        self.assertEqual(errors[-1].client_seq, HUGE)
        self.assertIn("cursors[1].seq is out of range", errors[0].message)
        # No answer from the rooms (they never saw the frames), no traceback.
        self.assertEqual(self.alice.events.of_type(cim_pb2.OFFLINE_ACK_A), [])
        self.assertEqual(self.alice.events.of_type(cim_pb2.OFFLINE_A), [])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.node.metrics.frames_refused["out_of_range"], len(cases))
        # The connection stays: these are answered, not fatal, and the store still works.
        self.assertIs(self.alice.server.state, ConnectionState.ESTABLISHED)
        self.send(
            self.alice,
            cim_pb2.OFFLINE_ACK_R,
            cim_pb2.OfflineAckR(
                cursors=[cim_pb2.Cursor(conversation="d:alice:bob", seq=STORE_MAX)]
            ),
        )
        self.assertEqual(len(self.alice.events.of_type(cim_pb2.OFFLINE_ACK_A)), 1)

    def test_a_refused_catch_up_request_is_ended_by_its_request_id(self) -> None:
        self.send(self.alice, cim_pb2.OFFLINE_R, cim_pb2.OfflineR(before=HUGE, request_id=7))
        [error] = self.errors()
        self.assertEqual(
            (error.code, error.request_type, error.request_id),
            (BAD_REQUEST, cim_pb2.OFFLINE_R, 7),
        )

    def test_history_gets_its_own_answer(self) -> None:
        self.send(self.alice, cim_pb2.HISTORY_R, cim_pb2.HistoryR(peer="bob", before=HUGE))
        [answer] = self.alice.events.of_type(cim_pb2.HISTORY_A)
        self.assertEqual(answer.error, "bad_request")
        self.assertIn("before is out of range", answer.message)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_group_and_contact_requests_echo_their_id(self) -> None:
        self.send(
            self.alice,
            cim_pb2.GROUP_R,
            cim_pb2.GroupRequest(request_id=HUGE, create=cim_pb2.CreateGroup(name="g")),
        )
        [answer] = self.alice.events.of_type(cim_pb2.GROUP_A)
        self.assertEqual((answer.request_id, answer.ok, answer.error), (HUGE, False, "bad_request"))

    def test_a_client_that_keeps_at_it_is_cut_and_the_log_stays_small(self) -> None:
        for n in range(500):
            self.alice.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=HUGE + n))
            if n % 50 == 0:
                self.alice.flush()
        self.alice.flush()
        self.assertEqual(self.node.metrics.frames_refused["out_of_range"], 100)
        self.assertEqual(self.node.metrics.frames_rejected["too many bad frames"], 1)
        self.assertTrue(self.alice.server_transport.disconnected)
        self.assertIsNone(self.node.im.sessions.session_for("alice"))
        # One line for the refusals (a minute), one for the close: not 100, not 500.
        self.assertEqual(len([line for line in self.lines if "refused a frame" in line]), 1)
        self.assertEqual(len([line for line in self.lines if "too many bad frames" in line]), 1)
        self.assertLessEqual(len(self.lines), 3)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_the_log_line_comes_back_after_a_minute_with_a_count(self) -> None:
        for _ in range(10):
            self.send(self.alice, cim_pb2.ACK_R, cim_pb2.AckR(msg_id=HUGE))
        for _ in range(4):  # heartbeats keep the connection alive across the minute
            self.node.clock.advance(20)
            self.alice.flush()
        self.send(self.alice, cim_pb2.ACK_R, cim_pb2.AckR(msg_id=HUGE))
        refused = [line for line in self.lines if "refused a frame" in line]
        self.assertEqual(len(refused), 2, self.lines)
        self.assertIn("msg_id is out of range", refused[0])
        self.assertIn("(9 more since the last line)", refused[1])
        self.assertIs(self.alice.server.state, ConnectionState.ESTABLISHED)

    def test_other_connections_have_their_own_line_and_count(self) -> None:
        bob = self.node.connect("bob")
        bob.flush()
        for _ in range(60):
            self.alice.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=HUGE))
        self.alice.flush()
        for _ in range(60):
            bob.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=HUGE))
        bob.flush()
        self.assertEqual(len([line for line in self.lines if "refused a frame" in line]), 2)
        # 60 each: under the limit of 100 for both, though 120 in all.
        self.assertIs(self.alice.server.state, ConnectionState.ESTABLISHED)
        self.assertIs(bob.server.state, ConnectionState.ESTABLISHED)
