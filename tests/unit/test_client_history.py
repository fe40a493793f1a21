"""The library's history requests (#14): each carries a request_id, several may be in
flight, and each answer finds its own request whatever the order the node answers in."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cim.protocols import cim_pb2

GROUP = "abcdefghijklmnopqrstuvwxyz"


def message(msg_id: int) -> cim_pb2.Message:
    found = cim_pb2.Message(id=msg_id, to="bob", text=f"m{msg_id}")
    setattr(found, "from", "alice")
    return found


def ids(messages: Iterable[cim_pb2.Message]) -> list[int]:
    return [m.id for m in messages]


class ChatClientHistoryTests(TestCase):
    def test_requests_carry_ids_and_answers_match_them_in_any_order(self) -> None:
        from cim.client.session import ChatClient, SessionFailed

        client = ChatClient(Clock(), "http://127.0.0.1:1", "bob", "pw")
        refused = client.history("alice")
        self.failureResultOf(refused, SessionFailed)
        sent: list[tuple[int, Any]] = []

        class Protocol:
            def send(self, frame_type: int, message: Any) -> None:
                sent.append((frame_type, message))

        client.protocol = Protocol()  # type: ignore[assignment]
        first = client.history("alice", limit=10)
        second = client.history(GROUP, before=7, group=True)
        third = client.history("carol")
        # Each asks for pages below the client's own frame limit (max_bytes), numbered.
        frame = client.max_frame_size
        [(_, one), (_, two), (_, three)] = sent
        self.assertEqual(
            one,
            cim_pb2.HistoryR(peer="alice", limit=10, max_bytes=frame, request_id=one.request_id),
        )
        self.assertEqual(
            two,
            cim_pb2.HistoryR(
                group=GROUP, before=7, limit=50, max_bytes=frame, request_id=two.request_id
            ),
        )
        self.assertEqual(len({one.request_id, two.request_id, three.request_id}), 3)
        # The node answers the second first: each answer finds its own request.
        answer = cim_pb2.HistoryA(messages=[message(2)], request_id=two.request_id)
        client.frame_received(cim_pb2.HISTORY_A, answer)
        self.assertEqual(ids(self.successResultOf(second).messages), [2])
        self.assertNoResult(first)
        # A release-1 answer (no id) goes to the oldest request still waiting.
        client.frame_received(cim_pb2.HISTORY_A, cim_pb2.HistoryA(messages=[message(1)]))
        self.assertEqual(ids(self.successResultOf(first).messages), [1])
        self.assertNoResult(third)
        from twisted.python.failure import Failure

        client.connection_closed(Failure(ConnectionError("gone")))
        self.failureResultOf(third, ConnectionError)
