"""Typing notices (issue #15, acceptance 5): live only, one per device and conversation
every 3 s, to the other side's online devices, never stored, refused like a message.

Whole nodes on a fake clock (``NodeHarness``, real SQLite timelines run inline) with
iosim clients; a cluster of two nodes on one memory bus for users on another node; the
daemon's own ContactBook for a block.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from itertools import pairwise
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cim.client.console import Console
from cim.im.direct import REASON_NOT_ACCEPTED
from cim.im.typing_notices import REASON_NOT_MEMBER, TYPING_INTERVAL
from cim.protocols import cim_pb2
from cim.scripts import client as cli
from cim.scripts.chat_commands import Listener, typing_command
from cim.scripts.output import ClientExit
from cim.storage.schema import conversations, timeline
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.fakes.timeline_node import TimelineNode, session
from tests.unit.test_client_session import make_client
from tests.unit.test_client_session import settle as settle_session
from tests.unit.test_console import FakeClient, text_message
from tests.unit.test_contacts_node import ContactNodeMixin
from tests.unit.test_delivery import FakeGroups, cluster, settle
from tests.unit.test_storage import sqlite_url

STARTED = cim_pb2.TYPING_STARTED
STOPPED = cim_pb2.TYPING_STOPPED


def type_to(
    client: ConnectedClient, to: str = "", group: str = "", state: int = STARTED, rid: int = 0
) -> None:
    client.protocol.send(
        cim_pb2.TYPING_R, cim_pb2.TypingR(to=to, group=group, state=state, request_id=rid)
    )


def notices(client: ConnectedClient) -> list[Any]:
    return list(client.events.of_type(cim_pb2.TYPING_N))


def rows_txn(connection: Connection) -> tuple[int, int]:
    return (
        connection.execute(select(func.count()).select_from(timeline)).scalar_one(),
        connection.execute(select(func.count()).select_from(conversations)).scalar_one(),
    )


class RefusingContacts:
    """Contact rules under which nobody accepts anything from ``refused`` senders."""

    def __init__(self, *refused: str) -> None:
        self.refused = set(refused)

    def known(self, sender: str, receiver: str) -> bool | None:
        return None  # always asked, as for an answer not remembered

    def account_known(self, sender: str, receiver: str) -> bool:
        return False

    def may_message(self, sender: str, receiver: str) -> Deferred[bool]:
        return succeed(sender not in self.refused)

    def circle(self, user: str) -> Deferred[list[str]]:
        return succeed([])

    def answer(self, actor: str, request: Any) -> Any:
        raise NotImplementedError


class RateTests(SynchronousTestCase):
    def test_twenty_in_3_s_reach_bob_as_one_and_nothing_is_stored(self) -> None:
        """Acceptance 5."""
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        settle(node)
        arrivals: list[float] = []
        for _ in range(20):  # 20 notices in 3 s (every 0.15 s: 0 .. 2.85 s)
            type_to(alice, "bob")
            settle(node)
            arrivals.extend(node.clock.seconds() for _ in notices(bob)[len(arrivals) :])
            node.clock.advance(0.15)
        self.assertEqual(len(arrivals), 1)
        [notice] = notices(bob)
        self.assertEqual(getattr(notice, "from"), "alice")
        self.assertEqual(
            (notice.device, notice.to, notice.state, notice.conversation),
            ("phone", "bob", STARTED, "d:alice:bob"),
        )
        # Keep typing for 9 s more: the notices that pass are 3 s apart at least.
        for _ in range(60):
            type_to(alice, "bob", state=STOPPED if len(arrivals) % 2 else STARTED)
            settle(node)
            arrivals.extend(node.clock.seconds() for _ in notices(bob)[len(arrivals) :])
            node.clock.advance(0.15)
        self.assertIn(len(arrivals), (3, 4))
        gaps = [later - earlier for earlier, later in pairwise(arrivals)]
        self.assertTrue(all(gap >= TYPING_INTERVAL - 1e-6 for gap in gaps), gaps)
        # Never the sender, never stored, never an answer without a request_id.
        self.assertEqual(notices(alice), [])
        self.assertEqual(alice.events.of_type(cim_pb2.TYPING_A), [])
        self.assertEqual(alice.events.of_type(cim_pb2.ERROR), [])
        assert node.database is not None
        self.assertEqual(self.successResultOf(node.database.run(rows_txn)), (0, 0))
        self.assertEqual(alice.events.of_type(cim_pb2.MSG_A), [])

    def test_the_rate_is_per_conversation_and_per_device(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        carol = node.connect("carol")
        dave = node.connect("dave", device="tablet")
        settle(node)
        type_to(alice, "bob")
        type_to(alice, "carol")  # another conversation: its own allowance
        type_to(dave, "bob")  # another device
        settle(node)
        self.assertEqual(len(notices(bob)), 2)
        self.assertEqual(len(notices(carol)), 1)
        self.assertEqual(sorted(getattr(n, "from") for n in notices(bob)), ["alice", "dave"])

    def test_a_request_id_gets_an_answer_that_says_dropped(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        node.connect("bob")
        settle(node)
        type_to(alice, "bob", rid=1)
        type_to(alice, "bob", rid=2)
        settle(node)
        answers = {a.request_id: a.dropped for a in alice.events.of_type(cim_pb2.TYPING_A)}
        self.assertEqual(answers, {1: False, 2: True})

    def test_nobody_online_nothing_happens(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        settle(node)
        type_to(alice, "bob", rid=1)
        settle(node)
        [answer] = alice.events.of_type(cim_pb2.TYPING_A)
        self.assertFalse(answer.dropped)
        assert node.database is not None
        self.assertEqual(self.successResultOf(node.database.run(rows_txn)), (0, 0))


class GroupTests(SynchronousTestCase):
    def test_other_members_online_get_it_never_the_sender(self) -> None:
        node = NodeHarness(groups=FakeGroups({"g1": ["alice", "bob", "carol", "erin"]}))
        alice, bob, carol, mallory = (node.connect(n) for n in ("alice", "bob", "carol", "mallory"))
        settle(node)
        type_to(alice, group="g1")
        settle(node)
        for member in (bob, carol):
            [notice] = notices(member)
            self.assertEqual(
                (getattr(notice, "from"), notice.group, notice.to, notice.conversation),
                ("alice", "g1", "", "g:g1"),
            )
        self.assertEqual(notices(alice), [])
        self.assertEqual(notices(mallory), [])

    def test_a_non_member_gets_an_error_and_nobody_hears(self) -> None:
        node = NodeHarness(groups=FakeGroups({"g1": ["alice", "bob"]}))
        bob, mallory = node.connect("bob"), node.connect("mallory")
        settle(node)
        type_to(mallory, group="g1", rid=5)
        settle(node)
        [error] = mallory.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            (error.code, error.message, error.request_type, error.request_id),
            (cim_pb2.Error.BAD_REQUEST, REASON_NOT_MEMBER, cim_pb2.TYPING_R, 5),
        )
        self.assertEqual(mallory.events.of_type(cim_pb2.TYPING_A), [])
        self.assertEqual(notices(bob), [])


class RefusalTests(SynchronousTestCase):
    def test_someone_who_does_not_accept_you_gets_nothing_and_you_an_error(self) -> None:
        node = NodeHarness()
        node.im.directory.contacts = RefusingContacts("mallory")
        bob, mallory = node.connect("bob"), node.connect("mallory")
        settle(node)
        type_to(mallory, "bob")
        settle(node)
        [error] = mallory.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            (error.code, error.message, error.request_type),
            (cim_pb2.Error.FORBIDDEN, REASON_NOT_ACCEPTED, cim_pb2.TYPING_R),
        )
        self.assertEqual(notices(bob), [])

    def test_bad_requests(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        settle(node)
        for rid, request in enumerate(
            (
                cim_pb2.TypingR(to="bob", group="g1", state=STARTED),
                cim_pb2.TypingR(state=STARTED),
                cim_pb2.TypingR(to="bob"),  # no state
                cim_pb2.TypingR(to="alice", state=STARTED),
            ),
            start=1,
        ):
            request.request_id = rid
            alice.protocol.send(cim_pb2.TYPING_R, request)
        settle(node)
        errors = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual([e.request_id for e in errors], [1, 2, 3, 4])
        self.assertEqual({e.code for e in errors}, {cim_pb2.Error.BAD_REQUEST})
        self.assertFalse(alice.server_transport.disconnecting)


class BlockedTests(ContactNodeMixin, TestCase):
    """The daemon's own contact rules: a block stops typing as it stops messages."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def test_a_blocked_user_cannot_type_to_the_blocker(self) -> None:
        alice, bob = self.node.connect("alice"), self.node.connect("bob")
        settle(self.node)
        self.assertTrue(self.ask(alice, block=cim_pb2.ContactRef(user="bob")).ok)
        type_to(bob, "alice", rid=9)
        settle(self.node)
        [error] = bob.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            (error.code, error.request_type, error.request_id),
            (cim_pb2.Error.FORBIDDEN, cim_pb2.TYPING_R, 9),
        )
        self.assertEqual(notices(alice), [])


class AcrossNodesTests(SynchronousTestCase):
    def test_a_notice_reaches_a_user_on_another_node_over_the_bus(self) -> None:
        one, two = cluster(FakeGroups({"g1": ["alice", "bob", "carol"]}))
        alice = one.connect("alice")
        bob = two.connect("bob")
        carol = one.connect("carol")
        settle(one, two)
        type_to(alice, "bob")
        settle(one, two)
        [notice] = notices(bob)
        self.assertEqual((getattr(notice, "from"), notice.to), ("alice", "bob"))
        type_to(alice, group="g1")
        settle(one, two)
        self.assertEqual([n.group for n in notices(bob)], ["", "g1"])
        self.assertEqual([n.group for n in notices(carol)], ["g1"])
        self.assertEqual(notices(alice), [])


class ClientLibraryTests(SynchronousTestCase):
    def test_session_sends_typing_and_hears_it(self) -> None:
        node = NodeHarness()
        alice, _, _ = make_client(node, "alice")
        bob, _, _ = make_client(node, "bob")
        heard: list[cim_pb2.TypingN] = []
        bob.on_typing = heard.append
        alice.start()
        bob.start()
        settle_session(node)
        answers: list[Any] = []
        alice.typing("bob").addBoth(answers.append)
        alice.typing("bob", stopped=True).addBoth(answers.append)
        settle_session(node)
        self.assertEqual([a.dropped for a in answers], [False, True])
        [notice] = heard
        self.assertEqual((getattr(notice, "from"), notice.state), ("alice", STARTED))


class CommandLineTests(SynchronousTestCase):
    def run_typing(self, node: NodeHarness, client: Any, *args: str) -> tuple[Any, list[Any]]:
        options = cli.build_parser().parse_args(["--user", client.user, "typing", *args])
        out = io.StringIO()
        with redirect_stdout(out):
            done = defer.ensureDeferred(typing_command(client, options))
            settle_session(node)
        return done, [json.loads(line) for line in out.getvalue().splitlines()]

    def test_typing_prints_sent_then_dropped_and_a_refusal_is_status_4(self) -> None:
        node = NodeHarness()
        node.im.directory.contacts = RefusingContacts("mallory")
        alice, _, _ = make_client(node, "alice")
        mallory, _, _ = make_client(node, "mallory")
        alice.start()
        mallory.start()
        settle_session(node)
        done, lines = self.run_typing(node, alice, "bob")
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual(lines, [{"to": "bob", "state": "typing", "status": "sent"}])
        done, lines = self.run_typing(node, alice, "bob", "--stopped")
        self.assertEqual(lines, [{"to": "bob", "state": "stopped", "status": "dropped"}])
        done, lines = self.run_typing(node, mallory, "bob")
        failure = self.failureResultOf(done, ClientExit)
        self.assertEqual(failure.value.status, 4)
        self.assertIn(REASON_NOT_ACCEPTED, str(failure.value))
        self.assertEqual(lines, [])
        done, _ = self.run_typing(node, alice)
        self.assertEqual(self.failureResultOf(done, ClientExit).value.status, 2)

    def test_listen_prints_typing_events_without_counting_them(self) -> None:
        node = TimelineNode("bob")
        client, clock, _ = session(node, ordered=True)
        options = cli.build_parser().parse_args(["--user", "bob", "listen", "--count", "1"])
        listener = Listener(clock, client, options)  # type: ignore[arg-type]
        out = io.StringIO()
        with redirect_stdout(out):
            done = defer.ensureDeferred(listener.run())
            node.connect(client)
            node.pump()
            notice = cim_pb2.TypingN(
                device="phone", to="bob", state=STARTED, conversation="d:alice:bob"
            )
            setattr(notice, "from", "alice")
            client.frame_received(cim_pb2.TYPING_N, notice)
            self.assertNoResult(done)  # a notice is not one of the --count messages
            node.live(node.append("alice", "hi", peer="bob"))
            node.pump()
            clock.advance(0)
        self.assertEqual(self.successResultOf(done), 0)
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual(
            first,
            {
                "event": "typing",
                "state": "typing",
                "from": "alice",
                "device": "phone",
                "to": "bob",
                "conversation": "d:alice:bob",
            },
        )
        self.assertEqual(second["text"], "hi")


class TypingClient(FakeClient):
    """The console's fake client, with typing and the app's state."""

    def __init__(self) -> None:
        super().__init__()
        self.typed: list[tuple[str, str]] = []
        self.app_states: list[str] = []
        self.on_typing: Any = None

    def typing(self, to: str = "", group: str = "", stopped: bool = False) -> Deferred[Any]:
        self.typed.append((to, group))
        return succeed(cim_pb2.TypingA())

    def set_app_state(self, state: str) -> Deferred[Any]:
        self.app_states.append(state)
        return succeed(cim_pb2.AppStateA(heartbeat_interval_ms=270_000))


class ConsoleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = Clock()
        self.client = TypingClient()
        self.lines: list[str] = []
        self.console = Console(self.reactor, self.client, write=self.lines.append)

    def run_line(self, line: str) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.console.command(line)))

    def notice(self, sender: str, state: int = STARTED, group: str = "") -> None:
        notice = cim_pb2.TypingN(state=state, group=group)
        setattr(notice, "from", sender)
        self.client.on_typing(notice)

    def test_typing_shows_in_the_toolbar_until_stopped_a_message_or_time(self) -> None:
        self.notice("bob")
        self.assertIn("bob typing…", self.console.status_text())
        self.notice("bob", STOPPED)
        self.assertNotIn("typing…", self.console.status_text())
        self.notice("bob")
        self.notice("carol", group="g1")
        self.console.groups["g1"] = "friends"
        self.assertIn("bob typing…, carol typing… in #friends", self.console.status_text())
        self.client.on_message(text_message("bob", "hi"))
        self.assertNotIn("bob typing…", self.console.status_text())
        self.reactor.advance(7)  # no newer notice: it goes by itself
        self.assertNotIn("typing…", self.console.status_text())
        [line] = self.lines
        self.assertTrue(line.endswith("] bob: hi"), line)

    def test_typing_a_line_tells_the_other_side_every_3_s_at_most(self) -> None:
        self.console.text_changed("h")  # no conversation yet: nobody to tell
        self.run_line("/to bob")
        for text in ("h", "he", "hel", "/to"):
            self.console.text_changed(text)
        self.assertEqual(self.client.typed, [("bob", "")])
        self.reactor.advance(3)
        self.console.text_changed("hell")
        self.assertEqual(self.client.typed, [("bob", ""), ("bob", "")])

    def test_app_command_switches_the_state(self) -> None:
        self.run_line("/app background")
        self.run_line("/app asleep")
        self.assertEqual(self.client.app_states, ["background"])
        self.assertIn("heartbeat every 270 s", self.lines[0])
        self.assertIn("usage: /app", self.lines[1])


class BrokenGroups(FakeGroups):
    def is_member(self, group: str, user: str) -> Deferred[bool]:
        return defer.fail(RuntimeError("the database is down"))


class FailureTests(SynchronousTestCase):
    def test_a_failed_lookup_is_logged_and_answered(self) -> None:
        node = NodeHarness(groups=BrokenGroups({}))
        alice = node.connect("alice")
        settle(node)
        type_to(alice, group="g1", rid=3)
        settle(node)
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual((error.code, error.request_id), (cim_pb2.Error.INTERNAL, 3))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
