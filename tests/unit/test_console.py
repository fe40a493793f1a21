"""The chat console: its commands and lines with a fake client, then the real thing in tmux.

The unit tests run the console's command and display logic against a fake ChatClient
and collect the lines it would print, with no terminal. The acceptance test starts a
real daemon and two ``cim-client`` consoles in a private tmux server and reads their
screens the way a user would.
"""

from __future__ import annotations

import datetime
import os
import time
from types import SimpleNamespace
from typing import Any

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.client.console import Console
from cim.client.console_input import history_path, input_history
from cim.client.console_lines import (
    Conversation,
    clock,
    offline_summary_line,
    parse_command,
    snippet,
)
from cim.client.corrections import Change
from cim.client.reads import ReadState
from cim.client.session import DeliveryOutcome, SessionFailed
from cim.protocols import cim_pb2


class FakeClient:
    """The parts of ChatClient the console uses, answering from canned data."""

    def __init__(self) -> None:
        self.user = "alice"
        self.state = "online"
        self.sent: list[tuple[cim_pb2.Message, Deferred[DeliveryOutcome]]] = []
        self.resent: list[int] = []
        self.next_seq = 100
        self.groups = [
            cim_pb2.GroupInfo(id="g1", name="friends", member_count=3),
            cim_pb2.GroupInfo(id="g2", name="work", member_count=5),
            cim_pb2.GroupInfo(id="g3", name="work", member_count=2),
        ]
        self.group_requests = 0
        self.online_answer: Deferred[cim_pb2.OnlineA] | None = None
        self.history_pages: list[cim_pb2.HistoryA] = []
        self.history_calls: list[tuple[str, int, int, bool]] = []
        self.on_message: Any = None
        self.on_state: Any = None
        # The session's catch-up as the console sees it: its summaries, as they come.
        self.catch_up = SimpleNamespace(on_summary=None, last_summary=None)
        self.reads = ReadState("alice")
        self.on_read: Any = None
        self.marked: list[tuple[str, int | None]] = []

    def mark_read(self, conversation: str, seq: int | None = None) -> Deferred[cim_pb2.ReadA]:
        self.marked.append((conversation, seq))
        newest = self.reads.newest(conversation)
        answer = cim_pb2.ReadA(
            conversation=conversation, seq=seq or newest, moved=True, last_seq=newest
        )
        self.reads.marked(answer)
        return succeed(answer)

    def devices(self) -> Deferred[cim_pb2.DevicesA]:
        return succeed(
            cim_pb2.DevicesA(
                devices=[
                    cim_pb2.DeviceOnline(device="cli", this_device=True),
                    cim_pb2.DeviceOnline(device="phone"),
                ]
            )
        )

    def send_message(self, message: cim_pb2.Message) -> Deferred[DeliveryOutcome]:
        message.client_seq = self.next_seq
        self.next_seq += 1
        waiter: Deferred[DeliveryOutcome] = Deferred()
        self.sent.append((message, waiter))
        return waiter

    def resend(self, client_seq: int) -> Deferred[DeliveryOutcome]:
        if client_seq not in {m.client_seq for m, _ in self.sent}:
            raise KeyError(client_seq)
        self.resent.append(client_seq)
        waiter: Deferred[DeliveryOutcome] = Deferred()
        self.sent.append((self.message(client_seq), waiter))
        return waiter

    def message(self, client_seq: int) -> cim_pb2.Message:
        return next(m for m, _ in self.sent if m.client_seq == client_seq)

    def online(self, offset: int, limit: int) -> Deferred[cim_pb2.OnlineA]:
        if self.online_answer is not None:
            return self.online_answer
        return succeed(cim_pb2.OnlineA(total=3, users=["alice", "bob", "carol"]))

    def group_request(self, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        assert request.HasField("list")
        self.group_requests += 1
        return succeed(cim_pb2.GroupAnswer(ok=True, groups=self.groups))

    def history(
        self, target: str, limit: int = 50, before: int = 0, group: bool = False
    ) -> Deferred[cim_pb2.HistoryA]:
        self.history_calls.append((target, limit, before, group))
        return succeed(self.history_pages.pop(0))


def text_message(sender: str, text: str, msg_id: int = 1, **fields: Any) -> cim_pb2.Message:
    message = cim_pb2.Message(id=msg_id, text=text, sent_at_ms=int(time.time() * 1000), **fields)
    setattr(message, "from", sender)
    return message


class ConsoleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = Clock()
        self.client = FakeClient()
        self.lines: list[str] = []
        self.console = Console(self.reactor, self.client, write=self.lines.append)

    def run_line(self, line: str) -> bool:
        result: bool = self.successResultOf(Deferred.fromCoroutine(self.console.command(line)))
        return result

    def printed(self) -> str:
        text = "\n".join(self.lines)
        self.lines.clear()
        return text

    def test_parse_command(self) -> None:
        self.assertEqual(parse_command("hello there"), ("", "hello there"))
        self.assertEqual(parse_command("  /TO  bob "), ("/to", "bob"))
        self.assertEqual(parse_command("/msg bob hi you"), ("/msg", "bob hi you"))
        self.assertEqual(parse_command("/history"), ("/history", ""))
        self.assertEqual(parse_command("//not a command"), ("", "/not a command"))

    def test_snippet_names_a_message_by_its_first_words(self) -> None:
        self.assertEqual(snippet("hello bob"), '"hello bob"')
        self.assertEqual(
            snippet("one two three four five six seven"), '"one two three four five …"'
        )
        self.assertEqual(snippet("x" * 50), '"' + "x" * 31 + '…"')

    def test_plain_line_needs_a_conversation(self) -> None:
        self.assertTrue(self.run_line("hello"))
        self.assertIn("/to USER", self.printed())
        self.assertEqual(self.client.sent, [])

    def test_to_then_send_reports_delivered(self) -> None:
        self.run_line("/to bob")
        self.assertIn("talking to bob", self.printed())
        self.run_line("hello bob, how are you today?")
        [(message, outcome)] = self.client.sent
        self.assertEqual((message.to, message.text), ("bob", "hello bob, how are you today?"))
        outcome.callback(DeliveryOutcome(message.client_seq, 7, "bob", "delivered"))
        self.assertEqual(self.printed(), '  ✓ delivered to bob: "hello bob, how are you …"')
        self.assertIn("bob", self.console.prompt_text())

    def test_stored_and_failed_then_retry(self) -> None:
        self.run_line("/to bob")
        self.run_line("are you there")
        self.run_line("second one")
        (first, first_outcome), (second, second_outcome) = self.client.sent
        first_outcome.callback(DeliveryOutcome(first.client_seq, 8, "bob", "stored"))
        self.assertIn(
            'stored for bob (offline; delivered when they log in): "are you there"', self.printed()
        )
        second_outcome.callback(
            DeliveryOutcome(second.client_seq, 0, "bob", "failed", "no answer from the node")
        )
        self.assertEqual(
            self.printed(),
            '  ✗ failed: no answer from the node: "second one" (/retry sends it again)',
        )
        self.run_line("/retry")
        self.assertEqual(self.client.resent, [second.client_seq])
        self.assertIn('sending "second one" again', self.printed())
        self.client.sent[-1][1].callback(DeliveryOutcome(second.client_seq, 9, "bob", "delivered"))
        self.assertIn('delivered to bob: "second one"', self.printed())
        self.run_line("/retry")
        self.assertIn("nothing failed", self.printed())

    def test_a_send_refused_at_once_is_still_reported(self) -> None:
        def refused(message: cim_pb2.Message) -> Deferred[DeliveryOutcome]:
            message.client_seq = 5
            return succeed(DeliveryOutcome(5, 0, "bob", "failed", "not connected (stopped)"))

        self.client.send_message = refused  # type: ignore[method-assign]
        self.run_line("/msg bob quick note")
        self.assertIn('✗ failed: not connected (stopped): "quick note"', self.printed())

    def test_msg_sends_without_switching(self) -> None:
        self.run_line("/to carol")
        self.run_line("/msg bob one off")
        [(message, _)] = self.client.sent
        self.assertEqual((message.to, message.text), ("bob", "one off"))
        self.assertEqual(self.console.conversation, Conversation("carol", "carol"))
        self.run_line("/msg bob")
        self.assertIn("usage: /msg USER TEXT", self.printed())

    def test_group_by_name_or_id(self) -> None:
        self.run_line("/group friends")
        self.assertEqual(self.console.conversation, Conversation("g1", "friends", group=True))
        self.assertIn("talking in #friends (3 members)", self.printed())
        self.assertIn("#friends", self.console.prompt_text())
        self.run_line("hi all")
        [(message, outcome)] = self.client.sent
        self.assertEqual((message.group, message.to, message.text), ("g1", "", "hi all"))
        outcome.callback(DeliveryOutcome(message.client_seq, 3, "g1", "accepted"))
        self.assertIn('✓ accepted by #friends: "hi all"', self.printed())
        self.run_line("/group g3")
        self.assertEqual(self.console.conversation, Conversation("g3", "work", group=True))

    def test_group_unknown_or_ambiguous(self) -> None:
        self.run_line("/group nowhere")
        self.assertIn("you are in no group 'nowhere'", self.printed())
        self.run_line("/group work")
        self.assertIn("2 groups are named 'work'; use an id: g2, g3", self.printed())
        self.assertIsNone(self.console.conversation)

    def test_groups_lists_them(self) -> None:
        self.run_line("/groups")
        self.assertIn("#friends  id g1, 3 members", self.printed())

    def test_incoming_lines(self) -> None:
        self.console.message_arrived(text_message("bob", "hi alice"))
        line = self.printed()
        self.assertRegex(line, r"^\[\d\d:\d\d:\d\d\] bob: hi alice$")
        self.assertIn("bob", self.console.known_users)
        self.console.message_arrived(text_message("carol", "hello group", group="g1"))
        # Unknown group: the console lists groups (the fake answers at once) to name it.
        self.assertIn("#friends carol: hello group", self.printed())
        self.assertEqual(self.client.group_requests, 1)
        self.console.message_arrived(text_message("carol", "again", msg_id=2, group="g1"))
        self.assertIn("#friends carol: again", self.printed())
        self.assertEqual(self.client.group_requests, 1)

    def test_my_messages_from_another_device(self) -> None:
        """Issue #15: what alice sends from her phone shows on this device as hers."""
        self.client.device = "cli"  # type: ignore[attr-defined]
        mine = text_message("alice", "hi bob", to="bob")
        mine.device = "phone"
        self.console.message_arrived(mine)
        self.assertTrue(self.printed().endswith("→ bob alice (phone): hi bob"))
        posted = text_message("alice", "hi all", msg_id=2, group="g1")
        posted.device = "phone"
        self.console.message_arrived(posted)
        self.assertTrue(self.printed().endswith("#friends alice (phone): hi all"))
        self.assertNotIn("alice", self.console.known_users)
        self.run_line("/devices")
        self.assertEqual(self.printed(), "* 2 devices online: cli *, phone")

    def test_media_and_location(self) -> None:
        image = text_message(
            "bob",
            "",
            type=cim_pb2.IMAGE,
            media=cim_pb2.Media(name="cat.jpg", size=1258291, mime="image/jpeg"),
        )
        self.console.message_arrived(image)
        self.assertTrue(self.printed().endswith("bob: [image] cat.jpg (1.2 MiB)"))
        place = text_message(
            "bob",
            "",
            type=cim_pb2.LOCATION,
            location=cim_pb2.Location(lat=52.52, lon=13.405, name="Berlin"),
        )
        self.console.message_arrived(place)
        self.assertTrue(self.printed().endswith("bob: [location] Berlin (52.52000, 13.40500)"))

    def test_clock_adds_the_date_for_older_messages(self) -> None:
        now = time.time()
        today = clock(int(now * 1000), now)
        self.assertRegex(today, r"^\d\d:\d\d:\d\d$")
        old = clock(int((now - 3 * 86400) * 1000), now)
        expected = datetime.datetime.fromtimestamp(now - 3 * 86400).strftime("%Y-%m-%d %H:%M")
        self.assertEqual(old, expected)

    def test_history_pages_oldest_first(self) -> None:
        self.run_line("/history")
        self.assertIn("choose a conversation first", self.printed())
        self.run_line("/to bob")
        self.printed()
        newest = [text_message("bob", f"b{n}", msg_id=n) for n in (5, 4)]
        older = [text_message("alice", "a3", msg_id=3, to="bob")]
        self.client.history_pages = [
            cim_pb2.HistoryA(messages=newest, more=True, next_before=4),
            cim_pb2.HistoryA(messages=older, more=True, next_before=3),
        ]
        self.run_line("/history 3")
        self.assertEqual(self.client.history_calls, [("bob", 3, 0, False), ("bob", 1, 4, False)])
        lines = self.printed().splitlines()
        self.assertEqual(lines[0], "--- the last 3 messages with bob ---")
        self.assertTrue(lines[1].endswith("→ bob alice: a3"), lines[1])
        self.assertTrue(lines[2].endswith("bob: b4"))
        self.assertTrue(lines[3].endswith("bob: b5"))
        self.client.history_pages = [cim_pb2.HistoryA(error="forbidden", message="not yours")]
        self.run_line("/history 2")
        self.assertIn("history refused: not yours", self.printed())
        self.run_line("/history many")
        self.assertIn("usage: /history [N]", self.printed())

    def test_group_history(self) -> None:
        self.run_line("/group friends")
        self.client.history_pages = [cim_pb2.HistoryA()]
        self.run_line("/history 5")
        self.assertEqual(self.client.history_calls, [("g1", 5, 0, True)])
        self.assertIn("no history with #friends", self.printed())

    def test_offline_summary(self) -> None:
        summary = cim_pb2.OfflineSummaryA(
            total=6,
            conversations=[
                cim_pb2.ConversationSummary(conversation="g:g1", group="g1", count=2),
                cim_pb2.ConversationSummary(conversation="d:alice:bob", peer="bob", count=3),
                cim_pb2.ConversationSummary(conversation="d:alice:carol", peer="carol", count=1),
            ],
            caught_up=[cim_pb2.Cursor(conversation="d:alice:dave", seq=4)],
        )
        self.assertEqual(
            offline_summary_line(summary), "2 unread messages in #g1, 3 with bob, 1 with carol"
        )
        self.console.groups["g1"] = "friends"
        self.client.catch_up.on_summary(summary)  # the catch-up's summary, before its pull
        self.assertEqual(
            self.printed(),
            "* while you were away: 2 unread messages in #friends, 3 with bob, 1 with carol",
        )
        self.assertIn("carol", self.console.known_users)
        self.client.catch_up.on_summary(cim_pb2.OfflineSummaryA(caught_up=summary.caught_up))
        self.assertEqual(self.printed(), "")
        self.console.state = "reconnecting"
        self.console.state_changed("online", "127.0.0.1:4000")
        self.assertEqual(self.printed(), "* online again (127.0.0.1:4000)")

    def test_unread_counts_and_read_marks(self) -> None:
        summary = cim_pb2.OfflineSummaryA(
            total=3,
            conversations=[
                cim_pb2.ConversationSummary(
                    conversation="d:alice:bob", peer="bob", count=3, last_seq=5, cursor=2
                )
            ],
        )
        self.client.reads.summary(summary)  # the session's own bookkeeping
        self.assertIn("│ unread: bob 3 │", self.console.status_text())
        self.run_line("/unread")
        self.assertEqual(self.printed(), "  bob: 3 unread")
        seen = cim_pb2.ReadNotice(conversation="d:alice:bob", reader="bob", seq=4, peer="bob")
        self.client.on_read(self.client.reads.notice(seen))
        self.assertEqual(self.printed(), "  ✓✓ bob read up to #4")
        mine = cim_pb2.ReadNotice(conversation="d:alice:bob", reader="alice", seq=5, last_seq=5)
        self.client.on_read(self.client.reads.notice(mine))  # read on another device
        self.assertEqual(self.printed(), "")
        self.assertNotIn("unread", self.console.status_text())
        self.run_line("/read")
        self.assertIn("no conversation yet", self.printed())
        self.run_line("/to bob")
        self.printed()
        self.run_line("/read")
        self.assertEqual(self.printed(), "* bob: read up to #5")
        self.assertEqual(self.client.marked, [("d:alice:bob", None)])

    def test_connection_states(self) -> None:
        self.assertIn("│ online │", self.console.status_text())
        self.console.state_changed("reconnecting", "in 4.2 s")
        self.assertEqual(self.printed(), "* connection lost; reconnecting in 4.2 s")
        self.assertIn("reconnecting in 4 s", self.console.status_text())
        self.reactor.advance(3)
        self.assertIn("reconnecting in 1 s", self.console.status_text())
        self.assertIn("(reconnecting)", self.console.prompt_text())
        self.console.state_changed("connecting", "")
        self.console.state_changed("reconnecting", "in 8.0 s")
        self.assertEqual(self.printed(), "")  # the toolbar counts down; no line per try
        self.console.state_changed("stopped", "kicked: logged in elsewhere")
        self.assertIn("* stopped: kicked: logged in elsewhere", self.printed())
        self.assertIn("stopped: kicked", self.console.status_text())

    def test_online_lists_and_remembers_users(self) -> None:
        self.run_line("/online")
        self.assertEqual(self.printed(), "* 3 online: alice, bob, carol")
        self.assertEqual(self.console.known_users, {"bob", "carol"})

    def test_a_request_while_disconnected_says_so(self) -> None:
        self.client.online_answer = fail(SessionFailed("not connected (reconnecting)"))
        self.assertTrue(self.run_line("/online"))
        self.assertEqual(self.printed(), "* /online failed: not connected (reconnecting)")

    def test_help_unknown_and_quit(self) -> None:
        self.run_line("/help")
        self.assertIn("/group NAME", self.printed())
        self.run_line("/frobnicate now")
        self.assertIn("unknown command /frobnicate", self.printed())
        self.assertFalse(self.run_line("/quit"))
        self.assertTrue(self.run_line(""))

    def completions(self, text: str) -> list[str]:
        found = self.console.completer.get_completions(Document(text), CompleteEvent())
        return [completion.text for completion in found]

    def test_completion(self) -> None:
        self.assertEqual(self.completions("/h"), ["/history", "/help"])
        self.assertEqual(self.completions("/gr"), ["/group", "/groups"])
        self.assertEqual(self.completions("hello"), [])
        self.run_line("/online")
        self.run_line("/groups")
        self.assertEqual(self.completions("/to "), ["bob", "carol"])
        self.assertEqual(self.completions("/msg c"), ["carol"])
        self.assertEqual(self.completions("/msg carol hel"), [])
        self.assertEqual(self.completions("/group f"), ["friends"])
        self.console.message_arrived(text_message("dave", "hi"))
        self.assertEqual(self.completions("/to d"), ["dave"])

    def test_input_history_file(self) -> None:
        cache = os.path.abspath(self.mktemp())
        self.patch(os, "environ", dict(os.environ, XDG_CACHE_HOME=cache))
        self.assertEqual(history_path("a/b"), os.path.join(cache, "cim", "history-a_b"))
        history = input_history("alice")
        self.assertIsInstance(history, FileHistory)
        self.assertEqual(os.stat(history_path("alice")).st_mode & 0o777, 0o600)
        os.makedirs(os.path.join(cache, "blocked"))
        with open(os.path.join(cache, "blocked", "cim"), "w"):
            pass  # a file where the directory should be
        self.patch(os, "environ", dict(os.environ, XDG_CACHE_HOME=os.path.join(cache, "blocked")))
        self.assertIsInstance(input_history("alice"), InMemoryHistory)


class ConsoleChangeTests(SynchronousTestCase):
    """Recall and edit in the console (#15): "(edited)", "message recalled", and
    /recall and /edit of the last message sent here."""

    def setUp(self) -> None:
        self.client = FakeClient()
        self.changes: list[tuple[str, int, str]] = []
        self.client.recall = self.recall  # type: ignore[attr-defined]
        self.client.edit = self.edit  # type: ignore[attr-defined]
        self.lines: list[str] = []
        self.console = Console(Clock(), self.client, write=self.lines.append)

    def recall(self, msg_id: int) -> Deferred[Change]:
        self.changes.append(("recall", msg_id, ""))
        return succeed(Change("recall", msg_id, "d:alice:bob", 3, "alice", "", 1000, 9, 4))

    def edit(self, msg_id: int, text: str) -> Deferred[Change]:
        self.changes.append(("edit", msg_id, text))
        return succeed(Change("edit", msg_id, "d:alice:bob", 3, "alice", text, 1000, 9, 4))

    def run_line(self, line: str) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.console.command(line)))

    def test_stored_messages_read_as_recalled_or_edited(self) -> None:
        recalled = text_message("bob", "", recalled=True)
        edited = text_message("bob", "new words", edited=True)
        self.console.message_arrived(recalled)
        self.console.message_arrived(edited)
        self.assertTrue(self.lines[0].endswith("bob: message recalled"))
        self.assertTrue(self.lines[1].endswith("bob: new words (edited)"))
        entry = text_message("bob", "", change=cim_pb2.RECALL, replaces=1)
        self.assertTrue(self.console.format_message(entry).endswith("bob: (recalled a message)"))

    def test_changes_of_others_are_shown(self) -> None:
        original = text_message("bob", "", recalled=True, group="g1")
        self.console.change_arrived(
            Change("recall", 1, "g:g1", 2, "carol", "", 1000, 7, 5, original)
        )
        self.console.change_arrived(Change("edit", 2, "d:alice:bob", 3, "bob", "fixed", 1000, 8, 6))
        self.assertTrue(self.lines[0].endswith("#g1 bob: message recalled by carol"))
        self.assertTrue(self.lines[1].endswith("bob: fixed (edited)"))

    def test_recall_and_edit_change_the_last_message_sent_here(self) -> None:
        self.run_line("/recall")
        self.assertIn("nothing of yours to recall here", self.lines[-1])
        self.run_line("/to bob")
        self.run_line("hello")
        [(_, waiter)] = self.client.sent
        waiter.callback(DeliveryOutcome(100, 55, "bob", "delivered"))
        self.run_line("/edit hello there")
        self.run_line("/recall")
        self.run_line("/recall 77")
        self.assertEqual(
            self.changes, [("edit", 55, "hello there"), ("recall", 55, ""), ("recall", 77, "")]
        )
        self.assertIn("alice: hello there (edited)", self.lines[-3])
        self.assertIn("alice: message recalled", self.lines[-1])
