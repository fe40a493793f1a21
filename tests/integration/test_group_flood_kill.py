"""Issue #16, acceptance 4 (second half): after kill -9 under a group flood, every
accepted group message reaches every member.

One real daemon (``twistd cim``) on a private PostgreSQL cluster (tests/integration/
support/postgresql.py: it starts in about a second, and PostgreSQL is what a
production node writes its timelines to), with [limits] low enough that the flood is
refused ``RATE_LIMITED``. A ten-member group: the flooder, five members connected
through the client library all along, four members who accepted their invitation
and left. The flooder hands the library all its posts at once (as fast as the library
lets it: it pipelines them until the node refuses, then paces the conversation).
While the first posts are being written the daemon is killed with SIGKILL, then
started again on the same database. The library resends what had no outcome; the
connected members reconnect and catch up; the four others log in on a device that
never logged in before and catch up.

What is checked, from what the senders were told and what the members' applications
were handed (``on_message``):

- every post ends (accepted or failed) within a bound;
- every post the flooder was told ACCEPTED is shown exactly once by every member but
  the flooder, in the group's order (``Message.seq`` strictly increasing per member),
  at the same seq for everyone;
- nothing is shown that was never accepted; a post whose outcome was still open at
  the kill (lost with the node) is resent by the library and must end accepted and
  shown, or failed and never shown;
- the flooder's application is handed none of its own posts (the library knows them
  as the device's own, even when their msg:A died with the node).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cim.client.session import Backoff, ChatClient, DeliveryOutcome
from cim.history.store import group_conversation
from cim.protocols import cim_pb2
from cim.storage.database import create_engine_for
from cim.storage.schema import conversations
from tests.integration.support.cluster import add_users, eventually, reactor
from tests.integration.support.daemons import PASSWORD, DaemonProcess
from tests.integration.support.postgresql import private_postgresql

FLOOD = 1500
"""Posts the flooder hands the library at once."""

KILL_AFTER = 150
"""The daemon is killed once the flooder has heard this many ACCEPTED: the first
batches are committed, later ones are being written, and most posts wait."""

LIMITS = (
    "[limits]\n"
    "messages = 1000/s\nmessages_burst = 2000\n"
    "group_posts = 200/s\ngroup_posts_burst = 400\n"
    "group_messages = 200/s\ngroup_messages_burst = 400\n"
)
"""The flooder's group posts are the limit it meets: 400 taken in the first burst,
the rest refused RATE_LIMITED and paced by the library."""

ONLINE = [f"on{n}" for n in range(5)]
OFFLINE = [f"off{n}" for n in range(4)]
FLOODER = "flooder"
MEMBERS = [FLOODER, *ONLINE, *OFFLINE]
RECEIVERS = [*ONLINE, *OFFLINE]

START_DEADLINE = 60.0
FLOOD_DEADLINE = 60.0
OUTCOME_DEADLINE = 150.0
SHOWN_DEADLINE = 90.0


@dataclass
class Post:
    text: str
    client_seq: int
    status: str = ""
    reason: str = ""
    open_at_kill: bool = False
    """No outcome yet when the daemon was killed."""
    in_flight_at_kill: bool = False
    """Open at the kill, and the node's last word about it was not a refusal: it had
    been taken, or was on its way (what the library resends after the restart)."""


class NodeWords:
    """What the node said about the flooder's posts, counted on the way to the library:
    its refusals (ERROR for a msg:R, which the library waits out and resends) and
    msg:A (taken)."""

    def __init__(self) -> None:
        self.refused: Counter[str] = Counter()
        self._last: dict[int, str] = {}

    def refused_last(self, client_seq: int) -> bool:
        return self._last.get(client_seq) == "refused"

    def listen(self, client: ChatClient) -> None:
        receive = client.frame_received

        def counting(frame_type: int, message: object) -> None:
            if isinstance(message, cim_pb2.Error) and message.request_type == cim_pb2.MSG_R:
                self.refused[cim_pb2.Error.Code.Name(message.code)] += 1
                self._last[message.client_seq] = "refused"
            elif isinstance(message, cim_pb2.MsgA):
                self._last[message.client_seq] = "taken"
            receive(frame_type, message)

        client.frame_received = counting  # type: ignore[method-assign]


@dataclass
class Seen:
    """What one member's application was handed, in order."""

    texts: list[str] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    """Messages of other conversations (the invitation's system notice)."""


def member_client(daemon: DaemonProcess, user: str, device: str, receiving: bool) -> ChatClient:
    return ChatClient(
        reactor,
        daemon.router_url,
        user,
        PASSWORD,
        device=device,
        backoff=Backoff(initial=0.2, maximum=1.0),
        rng=random.Random(f"{user}/{device}"),
        receiving=receiving,
        # Catch-up hands each conversation over oldest first: the application shows
        # the group in its order (the default hands the newest page over first).
        ordered=True,
    )


class GroupFloodKillTests(TestCase):
    timeout = 300

    def test_every_accepted_post_reaches_every_member_after_kill_9(self) -> None:
        return ensureDeferred(self._flood_and_kill())

    # --- the world --------------------------------------------------------------------

    def start_daemon(self) -> DaemonProcess:
        database = private_postgresql(self)
        self.database_url = database.url
        add_users(database.url, MEMBERS)
        daemon = DaemonProcess(
            os.path.abspath(self.mktemp()),
            "flood",
            extra=f"[database]\nurl = {database.url}\n" + LIMITS,
        )
        daemon.start(START_DEADLINE)
        self.addCleanup(daemon.stop)
        return daemon

    def client(
        self, daemon: DaemonProcess, user: str, device: str, seen: Seen | None
    ) -> ChatClient:
        client = member_client(daemon, user, device, receiving=seen is not None)
        if seen is not None:
            client.on_message = lambda message: _show(seen, message)
        self.addCleanup(lambda: ensureDeferred(client.stop(logout=False)))
        return client

    async def make_group(self, daemon: DaemonProcess, flooder: ChatClient) -> str:
        """The flooder creates it; every other member accepts the invitation (the four
        offline ones from a device that takes no messages, then go)."""
        answer = await flooder.group_request(
            cim_pb2.GroupRequest(create=cim_pb2.CreateGroup(name="flood", members=RECEIVERS))
        )
        self.assertTrue(answer.ok, answer.message)
        group_id = str(answer.group.id)
        for user in RECEIVERS:
            setup = self.client(daemon, user, "setup", None)
            await setup.start(deadline=30)
            accepted = await setup.group_request(
                cim_pb2.GroupRequest(accept=cim_pb2.GroupRef(group=group_id))
            )
            self.assertTrue(accepted.ok, f"{user}: {accepted.message}")
            await setup.stop(logout=False)
        return group_id

    # --- the run ----------------------------------------------------------------------

    async def _flood_and_kill(self) -> None:
        started = time.monotonic()
        daemon = self.start_daemon()
        seen = {user: Seen() for user in RECEIVERS}
        own = Seen()  # the flooder's application (its own posts are not handed back)
        flooder = self.client(daemon, FLOODER, "phone", own)
        await flooder.start(deadline=30)
        group_id = await self.make_group(daemon, flooder)
        members = {user: self.client(daemon, user, "phone", seen[user]) for user in ONLINE}
        await DeferredList([c.start(deadline=30) for c in members.values()], fireOnOneErrback=True)

        words = NodeWords()
        words.listen(flooder)
        posts: dict[str, Post] = {}
        statuses: Counter[str] = Counter()
        killed: Deferred[None] = Deferred()
        at_kill: dict[str, int] = {}

        def ended(outcome: DeliveryOutcome, post: Post) -> None:
            post.status, post.reason = outcome.status, outcome.reason
            statuses[outcome.status] += 1
            if killed.called or statuses["accepted"] < KILL_AFTER:
                return
            # kill -9 at once, from the ACCEPTED that reaches the count: the node is in
            # the middle of writing and answering the first burst.
            assert daemon.process is not None
            daemon.process.kill()
            at_kill.update(accepted=statuses["accepted"], refused=sum(words.refused.values()))
            for waiting in posts.values():
                waiting.open_at_kill = not waiting.status
                waiting.in_flight_at_kill = waiting.open_at_kill and not words.refused_last(
                    waiting.client_seq
                )
            killed.callback(None)

        for n in range(FLOOD):
            message = cim_pb2.Message(group=group_id, text=f"flood-{n:04d}")
            outcome = flooder.send_message(message)  # numbers it: message.client_seq
            posts[message.text] = post = Post(message.text, message.client_seq)
            outcome.addCallback(ended, post)
        await eventually(lambda: killed.called, FLOOD_DEADLINE, f"{KILL_AFTER} posts accepted")
        await deferToThread(daemon.kill)  # reaped
        killed_at = time.monotonic()
        written = await deferToThread(last_seq, self.database_url, group_id)
        daemon.spawn()
        await deferToThread(daemon.wait_healthy, START_DEADLINE)
        restarted = time.monotonic() - killed_at

        for user in OFFLINE:  # a device of theirs that never logged in before
            members[user] = self.client(daemon, user, "phone", seen[user])
            await members[user].start(deadline=30)
        waits = [
            await bounded(
                lambda: all(p.status for p in posts.values()),
                OUTCOME_DEADLINE,
                "every post's outcome",
            )
        ]
        must_show = {text for text, post in posts.items() if post.status == "accepted"}
        waits.append(
            await bounded(
                lambda: all(must_show <= set(s.texts) for s in seen.values()),
                SHOWN_DEADLINE,
                "every accepted post shown by every member",
            )
        )
        # Nothing left to hand over: a duplicate could only come before this.
        waits.append(
            await bounded(
                lambda: all(
                    not c.catch_up.running and not c.inbox.held() for c in members.values()
                ),
                30,
                "the members' catch-ups to end",
            )
        )
        report = Report.count(posts, seen, must_show, len(own.texts), written)
        line = report.line(words.refused)
        reasons = Counter(p.reason for p in posts.values() if p.status == "failed")
        print(
            f"\ngroup flood: {FLOOD} posts, kill -9 after {at_kill['accepted']} ACCEPTED "
            f"({at_kill['refused']} refusals before it), healthy again in {restarted:.1f} s\n"
            f"{line}\nother conversations shown: {sum(len(s.elsewhere) for s in seen.values())} "
            f"(the invitations' notices); failures {dict(reasons)}; "
            f"{'; '.join(waits)}; {time.monotonic() - started:.0f} s in all"
        )
        self.assertGreater(words.refused["RATE_LIMITED"], 0, "the flood met the limits")
        self.assertGreater(report.in_flight_at_kill, 0, "posts were on their way at the kill")
        self.assertEqual(report.problems(), [], line)


def last_seq(database_url: str, group_id: str) -> int:
    """The group timeline's last seq: what the killed node had committed."""
    engine = create_engine_for(database_url, pool_size=1)
    try:
        with engine.connect() as connection:
            found = connection.execute(
                select(conversations.c.last_seq).where(
                    conversations.c.key == group_conversation(group_id)
                )
            ).scalar()
    finally:
        engine.dispose()
    return int(found or 0)


async def bounded(check: Callable[[], bool], deadline: float, what: str) -> str:
    """Wait for an end state the report counts either way (what is still wrong at the
    deadline shows in its figures and fails the test there)."""
    try:
        took = await eventually(check, deadline, what)
    except AssertionError as passed:
        return str(passed)
    return f"{what}: {took:.1f} s"


def _show(seen: Seen, message: cim_pb2.Message) -> bool:
    if not message.group:
        seen.elsewhere.append(f"{message.conversation}#{message.seq} {message.text[:40]!r}")
        return True
    seen.texts.append(message.text)
    seen.seqs.append(message.seq)
    return True


@dataclass
class Report:
    """The figures: per post what its sender was told, per member what was shown."""

    sent: int
    statuses: Counter[str]
    open_at_kill: int
    in_flight_at_kill: int
    written_at_kill: int
    """Of those in flight, how many the node had committed before it died."""
    in_flight_ended: Counter[str]
    """How the posts in flight at the kill ended (accepted+shown, failed, ...)."""
    shown: dict[str, int]
    missing: dict[str, str]
    """Per member, the accepted posts it never showed."""
    lost: int
    duplicates: int
    order_violations: int
    seq_disagreements: int
    """A post shown at different seqs, or two posts at one seq."""
    shown_never_accepted: int
    shown_never_accepted_open_at_kill: int
    shown_failed: int
    handed_back: int
    """The flooder's own posts handed to its application as if someone else's."""

    @classmethod
    def count(
        cls,
        posts: dict[str, Post],
        seen: dict[str, Seen],
        must_show: set[str],
        handed_back: int,
        written_at_kill: int,
    ) -> Report:
        lost = duplicates = order = 0
        seq_of: dict[str, set[int]] = {}
        missing: dict[str, str] = {}
        for user, view in seen.items():
            times = Counter(view.texts)
            absent = sorted(text for text in must_show if times[text] == 0)
            lost += len(absent)
            if absent:
                missing[user] = _ranges(absent)
            duplicates += sum(n - 1 for n in times.values() if n > 1)
            order += sum(1 for a, b in zip(view.seqs, view.seqs[1:], strict=False) if b <= a)
            for text, seq in zip(view.texts, view.seqs, strict=True):
                seq_of.setdefault(text, set()).add(seq)
        firsts = [min(s) for s in seq_of.values()]
        disagreements = sum(len(s) > 1 for s in seq_of.values()) + len(firsts) - len(set(firsts))
        shown = [posts.get(text, Post(text, 0)) for text in seq_of]
        never = [post for post in shown if post.status != "accepted"]
        in_flight = [p for p in posts.values() if p.in_flight_at_kill]
        # Written before the kill, its ACCEPTED lost: the resend must find it, not add it.
        written = [p for p in in_flight if 0 < min(seq_of.get(p.text, {0})) <= written_at_kill]
        return cls(
            sent=len(posts),
            statuses=Counter(p.status or "unanswered" for p in posts.values()),
            open_at_kill=sum(p.open_at_kill for p in posts.values()),
            in_flight_at_kill=len(in_flight),
            written_at_kill=len(written),
            in_flight_ended=Counter(
                (p.status or "unanswered") + ("+shown" if p.text in seq_of else "")
                for p in in_flight
            ),
            shown={user: len(view.texts) for user, view in seen.items()},
            missing=missing,
            lost=lost,
            duplicates=duplicates,
            order_violations=order,
            seq_disagreements=disagreements,
            shown_never_accepted=len(never),
            shown_never_accepted_open_at_kill=sum(p.open_at_kill for p in never),
            shown_failed=sum(p.status == "failed" for p in shown),
            handed_back=handed_back,
        )

    def line(self, refused: Counter[str]) -> str:
        shown = " ".join(f"{user} {count}" for user, count in self.shown.items())
        ended = ", ".join(f"{n} {s}" for s, n in sorted(self.in_flight_ended.items()))
        return (
            f"sent {self.sent}, accepted {self.statuses['accepted']}, "
            f"refused {sum(refused.values())} {dict(refused)}, "
            f"failed {self.statuses['failed']}, unanswered {self.statuses['unanswered']}; "
            f"shown per member: {shown}; without an outcome at the kill {self.open_at_kill}, "
            f"of them in flight (outcome lost with the kill) {self.in_flight_at_kill} "
            f"({self.written_at_kill} written before it): {ended or 'none'}; "
            f"LOST {self.lost}, DUPLICATES {self.duplicates}, "
            f"ORDER VIOLATIONS {self.order_violations}, seq disagreements "
            f"{self.seq_disagreements}, shown though never accepted "
            f"{self.shown_never_accepted} (open at the kill "
            f"{self.shown_never_accepted_open_at_kill}, failed {self.shown_failed}), "
            f"own posts handed back to the flooder {self.handed_back}"
            + "".join(f"; {user} never showed {posts}" for user, posts in self.missing.items())
        )

    def problems(self) -> list[str]:
        found = []
        for figure, value in (
            ("unanswered", self.statuses["unanswered"]),
            ("lost", self.lost),
            ("duplicates", self.duplicates),
            ("order violations", self.order_violations),
            ("seq disagreements", self.seq_disagreements),
            ("shown though never accepted", self.shown_never_accepted),
            ("shown though failed", self.shown_failed),
            ("own posts handed back to the flooder", self.handed_back),
        ):
            if value:
                found.append(f"{value} {figure}")
        return found


def _ranges(texts: list[str]) -> str:
    """flood-0003, flood-0004, flood-0005, flood-0009 -> "3-5 9" (post numbers)."""
    numbers = sorted(int(text.rsplit("-", 1)[1]) for text in texts)
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return " ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
