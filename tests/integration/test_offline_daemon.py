"""The timelines with real processes: a daemon on RabbitMQ killed with kill -9 while
it appends a burst (group commits of 20); after the restart every message whose sender
was told "stored" is in the receiver's timeline exactly once (the client's resends of
what it never heard about are found again by their client sequence, not appended a
second time), numbered 1, 2, 3, ... without a hole, and the receiver gets each of them
once."""

from __future__ import annotations

import os
import random
import uuid
from collections import Counter

from sqlalchemy import select
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.trial.unittest import TestCase

from cim.client.session import Backoff, ChatClient, DeliveryOutcome
from cim.history.store import direct_conversation
from cim.protocols import cim_pb2
from cim.storage.database import open_engine, upgrade
from cim.storage.schema import timeline
from tests.integration.support.cluster import add_users, delete_queues, eventually, reactor
from tests.integration.support.daemons import PASSWORD, DaemonProcess
from tests.integration.test_reliability import shared_broker
from tests.integration.test_storage import scratch_postgresql_url


def client_for(daemon: DaemonProcess, user: str) -> ChatClient:
    return ChatClient(
        reactor,
        daemon.router_url,
        user,
        PASSWORD,
        device="test",
        backoff=Backoff(initial=0.2, maximum=1.0),
        rng=random.Random(user),
    )


class TimelineDaemonTests(TestCase):
    timeout = 240

    def test_kill_9_while_appending_on_sqlite(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        return ensureDeferred(self._kill_while_writing(f"sqlite:///{workdir}/shared.db"))

    def test_kill_9_while_appending_on_postgresql(self) -> None:
        url = scratch_postgresql_url(self)
        upgrade(url)  # the daemon refuses a PostgreSQL database that is behind
        return ensureDeferred(self._kill_while_writing(url))

    async def _kill_while_writing(self, database_url: str) -> None:
        amqp = shared_broker(self)
        suffix = uuid.uuid4().hex[:8]
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        exchange = f"cim.test.{suffix}"
        node_id = f"o{suffix}"
        daemon = DaemonProcess(
            os.path.join(workdir, "node"),
            node_id,
            extra=(
                f"[queue]\nbackend = rabbitmq\namqp_url = {amqp}\nexchange = {exchange}\n"
                f"[offline]\nbatch_size = 20\nbatch_wait = 100ms\n"
                f"[database]\nurl = {database_url}\n"
            ),
        )
        self.addCleanup(delete_queues, amqp, exchange, [node_id])
        add_users(database_url, ["alice", "bob"])
        engine = open_engine(database_url)
        self.addCleanup(engine.dispose)
        daemon.start()
        self.addCleanup(daemon.stop)

        alice = client_for(daemon, "alice")
        self.addCleanup(lambda: ensureDeferred(alice.stop(logout=False)))
        await alice.start()
        outcomes: dict[str, DeliveryOutcome] = {}

        def record(text: str, outcome: DeliveryOutcome) -> None:
            outcomes[text] = outcome

        def rows() -> list[tuple[int, str, int]]:
            with engine.connect() as connection:
                result = connection.execute(
                    select(timeline.c.msg_id, timeline.c.payload, timeline.c.seq).where(
                        timeline.c.conversation == direct_conversation("alice", "bob")
                    )
                )
                return [
                    (int(row[0]), cim_pb2.Message.FromString(bytes(row[1])).text, int(row[2]))
                    for row in result
                ]

        sends = []
        for number in range(600):
            body = f"m{number}"
            sends.append(alice.send_text("bob", body).addCallback(lambda o, t=body: record(t, o)))
        # Kill -9 once some batches are committed and more are being taken.
        await eventually(lambda: len(rows()) >= 40, 30, "a few batches to commit")
        written_before = len(rows())
        daemon.kill()
        daemon.start()
        await DeferredList(sends)
        self.assertEqual(len(outcomes), 600, "every send ends with an outcome")
        statuses = Counter(outcome.status for outcome in outcomes.values())
        failed = Counter(o.reason for o in outcomes.values() if o.status == "failed")
        # bob is offline throughout: a message is stored, or it failed. A node killed and
        # started again within the library's retry budget is no reason to fail one: the
        # library resends what was not answered once it is connected again.
        self.assertEqual(failed, Counter(), "no message fails for a restart of the node")
        self.assertEqual(dict(statuses), {"stored": 600})
        stored = {body: o.msg_id for body, o in outcomes.items() if o.status == "stored"}

        # On PostgreSQL "stored" is said only after the commit: everything stored is there
        # already. A SQLite node alone says it once the message is in its journal
        # (cim.history.journal), and copies it into the database file within a batch
        # wait: everything stored reaches the table, the journaled part a moment later.
        if database_url.startswith("sqlite"):
            await eventually(
                lambda: set(stored.values()) <= {msg_id for msg_id, _, _ in rows()},
                30,
                "the journal's copies of every stored message",
            )
        in_database = rows()
        ids = [msg_id for msg_id, _, _ in in_database]
        self.assertEqual(len(ids), len(set(ids)), "no message twice")
        self.assertLessEqual(set(stored.values()), set(ids), "every stored id is in the table")
        # A message the node had taken but whose "stored" never reached alice before
        # the kill is sent again after the restart; the restarted node's dedup memory
        # (the memory state store) is gone, but the timeline finds the resend by its
        # client sequence: no second row.
        contents = [content for _, content, _ in in_database]
        self.assertEqual(len(contents), len(set(contents)), "no text twice")
        seqs = sorted(seq for _, _, seq in in_database)
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)), "no hole, no number twice")

        # bob logs in once and gets every stored message, each once.
        bob = client_for(daemon, "bob")
        self.addCleanup(lambda: ensureDeferred(bob.stop(logout=False)))
        shown: list[str] = []
        bob.on_message = lambda message: shown.append(message.text)
        await bob.start()
        await eventually(lambda: set(shown) >= set(stored), 30, "bob to get them all")
        self.assertEqual(len(shown), len(set(shown)), "no message shown twice")
        self.assertEqual(set(shown), set(stored), "only what was sent is shown")
        print(
            f"\n{len(outcomes)} sent, kill -9 after {written_before} rows were written, "
            f"{len(stored)} stored, {len(in_database)} rows, {len(shown)} shown to bob "
            "once each"
        )
