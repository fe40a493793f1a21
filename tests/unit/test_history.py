"""HISTORY_R from the timelines (cim.history.service) and `cim-client history`.

The service reads a temporary SQLite file through a synchronous runner, with a
``task.Clock``; every page is by seq, newest first, bounded in count and bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from contextlib import redirect_stdout
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from cim.history.service import HistoryService
from cim.history.timeline import Timelines
from cim.protocols import cim_pb2
from cim.scripts import client as cli
from cim.storage.timeline import append_txn
from tests.unit.test_timeline import GROUP, DatabaseMixin, message, new


def ids(messages: Iterable[cim_pb2.Message]) -> list[int]:
    return [m.id for m in messages]


class HistoryServiceTests(DatabaseMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.members = {GROUP: {"alice", "bob"}}
        self.service = HistoryService(
            Timelines(self.db, self.clock),
            lambda group, user: user in self.members.get(group, set()),
        )
        batch = [
            message(i, *(("alice", "bob") if i % 2 else ("bob", "alice"))) for i in range(1, 61)
        ]
        batch += [message(100 + i, "carol", "bob") for i in range(3)]
        batch += [message(200 + i, "alice", group=GROUP) for i in range(5)]
        self.append(batch)

    def append(self, batch: list[cim_pb2.Message]) -> None:
        self.txn(append_txn, [new(m) for m in batch])

    def ask(self, user: str, **fields: Any) -> cim_pb2.HistoryA:
        return self.ok(self.service.answer(user, cim_pb2.HistoryR(**fields)))

    def seqs(self, answer: cim_pb2.HistoryA) -> list[int]:
        return [m.seq for m in answer.messages]

    def test_pages_newest_first_with_the_default_limit(self) -> None:
        first = self.ask("bob", peer="alice", request_id=3)
        self.assertEqual((first.error, first.more, first.request_id), ("", True, 3))
        self.assertEqual(ids(first.messages), list(range(60, 10, -1)))
        self.assertEqual(self.seqs(first), list(range(60, 10, -1)))
        self.assertEqual({m.conversation for m in first.messages}, {"d:alice:bob"})
        self.assertEqual(first.next_before, 11)
        second = self.ask("alice", peer="bob", before=first.next_before)
        self.assertEqual(ids(second.messages), list(range(10, 0, -1)))
        self.assertEqual((second.more, second.next_before), (False, 0))

    def test_a_gap_is_filled_with_after_and_before(self) -> None:
        gap = self.ask("bob", peer="alice", after=40, before=45)
        self.assertEqual(self.seqs(gap), [44, 43, 42, 41])
        self.assertFalse(gap.more)
        wide = self.ask("bob", peer="alice", after=5, before=50, limit=10)
        self.assertEqual(self.seqs(wide), list(range(49, 39, -1)))  # the newest page first
        self.assertTrue(wide.more)

    def test_pages_stay_below_the_frame_limit_and_the_readers_own(self) -> None:
        bomb = "\U0001f4a3" * 16_000
        self.append([message(300 + i, "carol", "dave", text=bomb) for i in range(3)])
        answers = []
        before = 0
        while True:
            answer = self.ask("dave", peer="carol", before=before)
            answers.append(ids(answer.messages))
            self.assertLess(answer.ByteSize(), 65_536 - 64)  # type byte and tag fit too
            if not answer.more:
                break
            before = answer.next_before
        self.assertEqual(answers, [[302], [301], [300]])
        # A reader announcing a smaller frame gets smaller pages of small messages.
        small = self.ask("bob", peer="alice", limit=50, max_bytes=1024)
        self.assertLess(small.ByteSize(), 1024)
        self.assertGreater(len(small.messages), 1)
        self.assertTrue(small.more)

    def test_limit_is_capped(self) -> None:
        self.assertEqual(len(self.ask("bob", peer="alice", limit=7).messages), 7)
        self.append([message(1000 + i) for i in range(300)])
        self.assertEqual(len(self.ask("bob", peer="alice", limit=100000).messages), 200)

    def test_a_huge_before_means_the_newest_page(self) -> None:
        answer = self.ask("alice", peer="bob", before=(1 << 64) - 1, limit=3)
        self.assertEqual(ids(answer.messages), [60, 59, 58])

    def test_a_user_reads_only_their_own_conversations(self) -> None:
        # carol asks about bob: she gets her conversation with bob, never alice's.
        answer = self.ask("carol", peer="bob")
        self.assertEqual(ids(answer.messages), [102, 101, 100])
        self.assertEqual(self.ask("dave", peer="alice").messages, [])

    def test_group_history_is_for_members(self) -> None:
        answer = self.ask("bob", group=GROUP)
        self.assertEqual(ids(answer.messages), [204, 203, 202, 201, 200])
        self.assertEqual([m.group_seq for m in answer.messages], [5, 4, 3, 2, 1])
        refused = self.ask("carol", group=GROUP, request_id=9)
        self.assertEqual((refused.error, refused.request_id), ("forbidden", 9))
        self.assertEqual(refused.messages, [])
        self.assertIn("not a participant", refused.message)
        # A group that does not exist looks the same: no probing for group ids.
        self.assertEqual(self.ask("carol", group="z" * 26).error, "forbidden")
        # Membership is checked now, not when the message was sent.
        self.members[GROUP].discard("bob")
        self.assertEqual(self.ask("bob", group=GROUP).error, "forbidden")

    def test_exactly_one_of_peer_and_group(self) -> None:
        self.assertEqual(self.ask("bob").error, "bad_request")
        self.assertEqual(self.ask("bob", peer="alice", group=GROUP).error, "bad_request")

    def test_a_database_failure_is_an_answer_not_a_failure(self) -> None:
        self.ok(self.db.stop())
        answer = self.ask("bob", peer="alice", request_id=4)
        self.assertEqual((answer.error, answer.request_id), ("unavailable", 4))


# --- the client ------------------------------------------------------------------------


class FakeHistoryClient:
    def __init__(self, pages: list[cim_pb2.HistoryA]) -> None:
        self.pages = pages
        self.requests: list[tuple[str, int, int, bool]] = []

    def history(
        self, target: str, limit: int = 50, before: int = 0, group: bool = False
    ) -> Deferred[cim_pb2.HistoryA]:
        self.requests.append((target, limit, before, group))
        return succeed(self.pages.pop(0))

    def group_request(self, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        return succeed(
            cim_pb2.GroupAnswer(ok=True, groups=[cim_pb2.GroupInfo(id=GROUP, name="team")])
        )


class HistoryCommandTests(TestCase):
    def test_parsing(self) -> None:
        parser = cli.build_parser()
        options = parser.parse_args(["--user", "bob", "history", "alice"])
        self.assertEqual(
            (options.command, options.peer, options.group, options.limit, options.before),
            ("history", "alice", False, 50, 0),
        )
        options = parser.parse_args(
            ["--user", "bob", "history", "team", "--group", "--limit", "5", "--before", "123"]
        )
        self.assertEqual(
            (options.peer, options.group, options.limit, options.before), ("team", True, 5, 123)
        )
        for bad in (["--limit", "0"], ["--limit", "x"], ["--before", "-1"]):
            with self.assertRaises(SystemExit), redirect_stdout(io.StringIO()):
                parser.parse_args(["--user", "bob", "history", "alice", *bad])

    def run_command(
        self, client: FakeHistoryClient, *args: str
    ) -> tuple[Any, list[dict[str, Any]]]:
        options = cli.build_parser().parse_args(["--user", "bob", "history", *args])
        out = io.StringIO()
        with redirect_stdout(out):
            d = defer.ensureDeferred(cli.history_command(client, options))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        return d, lines

    def test_prints_message_json_newest_first_across_pages(self) -> None:
        pages = [
            cim_pb2.HistoryA(
                messages=[message(i) for i in range(400, 200, -1)], more=True, next_before=201
            ),
            cim_pb2.HistoryA(
                messages=[message(i) for i in range(200, 150, -1)], more=True, next_before=151
            ),
        ]
        client = FakeHistoryClient(pages)
        d, lines = self.run_command(client, "alice", "--limit", "250")
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual([line["msg_id"] for line in lines], [str(i) for i in range(400, 150, -1)])
        self.assertEqual(lines[0]["from"], "alice")
        self.assertEqual(lines[0], json.loads(cli.message_json(message(400))))
        self.assertEqual(client.requests, [("alice", 200, 0, False), ("alice", 50, 201, False)])

    def test_group_by_name(self) -> None:
        client = FakeHistoryClient([cim_pb2.HistoryA(messages=[message(5, group=GROUP)])])
        d, lines = self.run_command(client, "team", "--group", "--before", "9")
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(lines[0]["group"], GROUP)
        self.assertEqual(client.requests, [(GROUP, 50, 9, True)])

    def test_a_refusal_exits_4_with_the_reason(self) -> None:
        client = FakeHistoryClient(
            [cim_pb2.HistoryA(error="forbidden", message="you are not a participant of group x")]
        )
        d, lines = self.run_command(client, "alice")
        error = self.failureResultOf(d, cli.ClientExit).value
        self.assertEqual(error.status, 4)  # refused, as every permission refusal
        self.assertIn("forbidden", error.message)
        self.assertIn("not a participant", error.message)
        self.assertEqual(lines, [])

    def test_history_unavailable_exits_1(self) -> None:
        client = FakeHistoryClient(
            [cim_pb2.HistoryA(error="unavailable", message="history is not kept on this node")]
        )
        d, _ = self.run_command(client, "alice")
        error = self.failureResultOf(d, cli.ClientExit).value
        self.assertEqual(error.status, 1)
        self.assertIn("unavailable", error.message)
