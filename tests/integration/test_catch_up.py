"""Catch-up at scale with a real daemon on the embedded default (SQLite): acceptance 5
of issue 14.

10,000 messages wait for bob in 50 conversations (200 from each of 50 senders) when
his device logs in through the client library (``ChatClient``, default hand-over:
newest page first). The test checks what the device was sent and what the
application was handed:

- the summary is ONE frame (one OFFLINE_SUMMARY_A) listing the 50 conversations with
  their counts, newest activity first;
- the first messages the application gets are the newest page of the newest
  conversation, handed over while only that page has been pulled (one OFFLINE_R sent,
  one OFFLINE_A received);
- pulled = stored: every stored message handed over once, each conversation complete,
  and nothing left past the device's cursors afterwards.

The messages are written into the daemon's database before it starts with the
timelines' own append (``cim.storage.timeline.append_txn``, what the node's group
commit runs), so the test spends its time on the catch-up; the benchmark
(``python -m bench.run --only catch_up``) stores them over the protocol and checks the
same counts. The device is observed by ``bench.catch_up_client`` (the benchmark's
instrument), so what the figures are made of is what is asserted here.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from bench.catch_up_client import observe_catch_up
from cim.history.store import direct_conversation
from cim.protocols import cim_pb2
from cim.storage.database import open_engine
from cim.storage.timeline import NewMessage, append_txn
from cim.storage.timeline_reads import unread_count_txn
from tests.integration.support.cluster import add_users, reactor
from tests.integration.support.daemons import PASSWORD, DaemonProcess

MESSAGES = 10_000
CONVERSATIONS = 50
PER_CONVERSATION = MESSAGES // CONVERSATIONS
RECEIVER = "bob"
SENDERS = [f"f{n:02d}" for n in range(CONVERSATIONS)]
FIRST_ID = 1 << 40
START = 1_790_000_000.0


def stored_message(number: int) -> NewMessage:
    """Message ``number`` (1 .. MESSAGES): from ``SENDERS[number % 50]``, so the
    newest one (10,000) is f00's and f00's conversation is the newest activity."""
    sender = SENDERS[number % CONVERSATIONS]
    message = cim_pb2.Message(
        id=FIRST_ID + number,
        to=RECEIVER,
        text=f"message {number} " + "x" * 40,
        sent_at_ms=int((START + number / 1000) * 1000),
        client_seq=number,
        device="phone",
    )
    setattr(message, "from", sender)
    return NewMessage(
        direct_conversation(sender, RECEIVER),
        message.id,
        sender,
        "phone",
        message.client_seq,
        message.sent_at_ms / 1000,
        message.SerializeToString(deterministic=True),
        ((sender, RECEIVER), (RECEIVER, sender)),
    )


def store(database_url: str) -> dict[str, list[int]]:
    """Append every message, oldest first; returns each conversation's ids in seq order."""
    engine = open_engine(database_url)
    by_conversation: dict[str, list[int]] = defaultdict(list)
    try:
        batch = [stored_message(n) for n in range(1, MESSAGES + 1)]
        for start in range(0, MESSAGES, 2000):
            with engine.begin() as connection:
                placed = append_txn(connection, batch[start : start + 2000])
            for appended in sorted(placed.values(), key=lambda a: a.seq):
                by_conversation[appended.conversation].append(appended.msg_id)
    finally:
        engine.dispose()
    return dict(by_conversation)


class CatchUpAtScaleTests(TestCase):
    timeout = 240

    def test_ten_thousand_in_fifty_conversations(self) -> None:
        return ensureDeferred(self._catch_up())

    async def _catch_up(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        daemon = DaemonProcess(os.path.join(workdir, "node"), "catchup")
        os.makedirs(os.path.join(daemon.workdir, "data"), exist_ok=True)
        database_url = "sqlite:///" + os.path.join(daemon.workdir, "data", "cim.db")
        add_users(database_url, [RECEIVER, *SENDERS])  # also migrates the new database
        stored = store(database_url)
        self.assertEqual({len(ids) for ids in stored.values()}, {PER_CONVERSATION})
        daemon.start()
        self.addCleanup(daemon.stop)

        seen = await observe_catch_up(reactor, daemon.router_url, RECEIVER, PASSWORD, "phone", 120)
        self.assertFalse(seen.timed_out, f"the catch-up did not end: {seen.received}")

        # The summary: one frame, the 50 conversations, newest activity first.
        newest = direct_conversation("f00", RECEIVER)
        self.assertEqual(seen.summaries, 1)
        self.assertEqual(seen.received.get("OFFLINE_SUMMARY_A"), 1)
        self.assertEqual(seen.sent.get("OFFLINE_SUMMARY_R"), 1)
        self.assertEqual(sorted(seen.summary_conversations), sorted(stored))
        self.assertEqual(seen.summary_counts, [PER_CONVERSATION] * CONVERSATIONS)
        self.assertEqual(seen.summary_total, MESSAGES)
        self.assertFalse(seen.summary_more)
        self.assertEqual(seen.summary_conversations[0], newest)

        # The first page handed over is the newest page of the newest conversation,
        # and it reached the application before anything else was pulled.
        page = len(seen.first_page)
        self.assertGreater(page, 0)
        self.assertLess(page, MESSAGES)
        self.assertEqual(seen.first_page_conversation, newest)
        self.assertEqual(sorted(seen.first_page), stored[newest][-page:])
        self.assertEqual(
            (seen.pulls_sent_at_first_message, seen.pages_received_at_first_message), (1, 1)
        )
        first = seen.handed[:page]
        self.assertEqual([entry[2] for entry in first], stored[newest][-page:])  # oldest first
        self.assertEqual(
            [entry[1] for entry in first],
            list(range(PER_CONVERSATION - page + 1, PER_CONVERSATION + 1)),
        )
        self.assertIsNotNone(seen.first_page_seconds)

        # Pulled = stored, each once.
        handed = Counter(entry[2] for entry in seen.handed)
        self.assertEqual(len(seen.handed), MESSAGES)
        self.assertEqual(set(handed.values()), {1})
        self.assertEqual(sorted(handed), sorted(i for ids in stored.values() for i in ids))
        seqs: dict[str, set[int]] = defaultdict(set)
        for conversation, seq, _ in seen.handed:
            seqs[conversation].add(seq)
        expected = set(range(1, PER_CONVERSATION + 1))
        self.assertEqual({c: s for c, s in seqs.items() if s != expected}, {})
        self.assertEqual(seen.sent.get("OFFLINE_ACK_R"), 1)

        # The cursors moved: nothing is left for this device.
        self.assertEqual(seen.left_after, 0)
        engine = open_engine(database_url)
        self.addCleanup(engine.dispose)
        with engine.connect() as connection:
            self.assertEqual(unread_count_txn(connection, RECEIVER, "phone"), 0)
            # A device new to the account once another has read starts at the present
            # (#15): none of them is unread there; it pages back through history.
            self.assertEqual(unread_count_txn(connection, RECEIVER, "laptop"), 0)
        print(
            f"\n{MESSAGES:,} in {CONVERSATIONS} conversations: summary at "
            f"{seen.summary_seconds:.3f} s ({seen.summary_bytes:,} bytes), first page of "
            f"{page} at {seen.first_page_seconds:.3f} s, all at {seen.done_seconds:.3f} s; "
            f"frames in {seen.received}, out {seen.sent}"
        )
