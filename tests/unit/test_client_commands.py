"""cim-client's sync and listen over the library (#14): sync prints the summary and
takes nothing; listen prints the catch-up oldest first, each message once, then live
ones, and stops taking after --count."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.protocols import cim_pb2
from cim.scripts import client as cli
from cim.scripts.chat_commands import Listener, sync_command
from tests.fakes.timeline_node import TimelineNode, session


def printed(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


class SyncTests(SynchronousTestCase):
    def test_prints_the_summary_and_moves_no_cursor(self) -> None:
        node = TimelineNode("bob")
        node.append("alice", "x", peer="bob")
        node.append("bob", "y", peer="alice")
        node.append("carol", "in the group", group="g1")
        node.cursors["g:g1"] = 1
        client, _, _ = session(node, receiving=False)
        node.connect(client)
        out = io.StringIO()
        with redirect_stdout(out):
            done = defer.ensureDeferred(sync_command(client))
            node.pump()
        self.assertEqual(self.successResultOf(done), 0)
        [document] = printed(out)
        self.assertEqual((document["total"], document["more"]), (2, False))
        [conversation] = document["items"]
        newest = conversation.pop("newest")
        self.assertEqual(
            conversation,
            {
                "conversation": "d:alice:bob",
                "peer": "alice",
                "count": 2,
                "last_seq": 2,
                "cursor": 0,
                "newest_cut": False,
            },
        )
        self.assertEqual((newest["text"], newest["seq"]), ("y", 2))
        self.assertEqual([kind for kind, _ in node.sent], [cim_pb2.OFFLINE_SUMMARY_R])
        self.assertEqual(node.cursors, {"d:alice:bob": 0, "g:g1": 1})

    def test_the_parser_knows_sync(self) -> None:
        options = cli.build_parser().parse_args(["--user", "bob", "sync"])
        self.assertEqual(options.command, "sync")
        self.assertNotIn("sync", cli.RECEIVING_COMMANDS)  # it takes no message


class ListenTests(SynchronousTestCase):
    def listen(self, node: TimelineNode, *args: str) -> tuple[Any, io.StringIO, Any, Clock]:
        client, clock, _ = session(node, ordered=True)
        options = cli.build_parser().parse_args(["--user", "bob", "listen", *args])
        listener = Listener(clock, client, options)  # type: ignore[arg-type]
        out = io.StringIO()
        with redirect_stdout(out):
            done = defer.ensureDeferred(listener.run())
            node.connect(client)
            node.pump()
            clock.advance(0)
        return done, out, client, clock

    def test_catch_up_oldest_first_then_live(self) -> None:
        node = TimelineNode("bob", page=2)
        for text in ("a1", "a2", "a3"):
            node.append("alice", text, peer="bob")
        node.append("carol", "c1", peer="bob")
        done, out, _client, clock = self.listen(node, "--count", "5")
        with redirect_stdout(out):
            node.live(node.append("alice", "a4", peer="bob"))
            node.pump()
            clock.advance(0)
        self.assertEqual(self.successResultOf(done), 0)
        texts = [line["text"] for line in printed(out)]
        self.assertEqual(texts, ["c1", "a1", "a2", "a3", "a4"])
        self.assertEqual(node.cursors, {"d:alice:bob": 4, "d:bob:carol": 1})

    def test_count_stops_taking_the_rest_stays_unread(self) -> None:
        node = TimelineNode("bob", page=2)
        node.append("alice", "x", peer="bob")
        node.append("bob", "y", peer="alice")
        done, out, _client, _clock = self.listen(node, "--count", "1")
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual([line["text"] for line in printed(out)], ["x"])
        self.assertEqual(node.cursors["d:alice:bob"], 1)

    def test_recall_and_edit_are_lines_with_an_event(self) -> None:
        """#15: at catch-up and live, a change is one JSON line naming its event."""
        node = TimelineNode("bob", page=5)
        first = node.append("alice", "oops", peer="bob")
        second = node.append("alice", "tpyo", peer="bob")
        recall = node.append("alice", "", peer="bob")
        recall.change, recall.replaces, recall.replaces_seq = cim_pb2.RECALL, first.id, first.seq
        done, out, _client, clock = self.listen(node, "--count", "4")
        edit = node.append("alice", "typo", peer="bob")
        edit.change, edit.replaces, edit.replaces_seq = cim_pb2.EDIT, second.id, second.seq
        with redirect_stdout(out):
            node.live(edit)
            node.pump()
            clock.advance(0)
        self.assertEqual(self.successResultOf(done), 0)
        lines = printed(out)
        self.assertEqual([line.get("text") for line in lines[:2]], ["oops", "tpyo"])
        self.assertEqual(
            [(line["event"], line["msg_id"], line.get("text")) for line in lines[2:]],
            [("recall", str(first.id), None), ("edit", str(second.id), "typo")],
        )
        self.assertEqual(lines[3]["by"], "alice")
        self.assertEqual(node.cursors["d:alice:bob"], 4)

    def test_the_parser_knows_recall_and_edit(self) -> None:
        options = cli.build_parser().parse_args(["--user", "bob", "edit", "42", "new text"])
        self.assertEqual((options.command, options.msg_id, options.text), ("edit", 42, "new text"))
        options = cli.build_parser().parse_args(["--user", "bob", "recall", "42"])
        self.assertEqual((options.command, options.msg_id), ("recall", 42))


class ExitTests(SynchronousTestCase):
    def test_a_request_without_answer_or_refused_is_one_line_and_a_status(self) -> None:
        from cim.client.answers import RequestRefused, RequestTimedOut
        from cim.scripts.login import exit_for
        from cim.scripts.output import EXIT_FAILED, EXIT_UNREACHABLE

        silent = exit_for(RequestTimedOut("OFFLINE_SUMMARY_R", "no answer within 10 s, 4 times"))
        self.assertEqual(
            (silent.status, silent.message),
            (
                EXIT_UNREACHABLE,
                "the node did not answer OFFLINE_SUMMARY_R: no answer within 10 s, 4 times",
            ),
        )
        refused = exit_for(RequestRefused("GROUP_R", "BAD_REQUEST: no name"))
        self.assertEqual(
            (refused.status, refused.message),
            (EXIT_FAILED, "the node refused GROUP_R: BAD_REQUEST: no name"),
        )
