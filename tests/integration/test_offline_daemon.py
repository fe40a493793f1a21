"""The offline pipeline with real processes: a daemon on RabbitMQ killed with kill -9
while its writer is storing a burst; after the restart every message whose sender was
told "stored" is in the database exactly once, and the receiver gets each of them."""

from __future__ import annotations

import os
import random
import uuid
from collections import Counter

from sqlalchemy import text
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.trial.unittest import TestCase

from cim.client.session import Backoff, ChatClient, DeliveryOutcome
from cim.storage.database import open_engine, upgrade
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


class OfflinePipelineDaemonTests(TestCase):
    timeout = 240

    def test_kill_9_while_the_writer_stores_on_sqlite(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        return ensureDeferred(self._kill_while_writing(f"sqlite:///{workdir}/shared.db"))

    def test_kill_9_while_the_writer_stores_on_postgresql(self) -> None:
        url = scratch_postgresql_url(self)
        upgrade(url)  # the daemon refuses a PostgreSQL database that is behind
        return ensureDeferred(self._kill_while_writing(url))

    async def _kill_while_writing(self, database_url: str) -> None:
        amqp = shared_broker(self)
        suffix = uuid.uuid4().hex[:8]
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        queue = f"cim.offline.{suffix}"
        archive_queue = f"cim.archive.{suffix}"
        exchange = f"cim.test.{suffix}"
        node_id = f"o{suffix}"
        daemon = DaemonProcess(
            os.path.join(workdir, "node"),
            node_id,
            extra=(
                f"[queue]\nbackend = rabbitmq\namqp_url = {amqp}\nexchange = {exchange}\n"
                f"[offline]\nqueue = {queue}\nbatch_size = 20\nbatch_wait = 100ms\n"
                f"[archive]\nqueue = {archive_queue}\n"
                f"[database]\nurl = {database_url}\n"
            ),
        )
        self.addCleanup(delete_queues, amqp, exchange, [node_id])
        self.addCleanup(_delete_plain_queues, amqp, [queue, archive_queue])
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

        def rows() -> list[tuple[int, str]]:
            with engine.connect() as connection:
                result = connection.execute(
                    text("SELECT msg_id, msg_content FROM offline_msgs WHERE receiver_uid = 'bob'")
                )
                return [(int(row[0]), str(row[1])) for row in result]

        sends = []
        for number in range(600):
            body = f"m{number}"
            sends.append(alice.send_text("bob", body).addCallback(lambda o, t=body: record(t, o)))
        # Kill -9 once the writer has committed some batches and the broker holds more.
        await eventually(lambda: len(rows()) >= 40, 30, "the writer to commit a few batches")
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

        # The restarted writer drains what the broker still holds.
        await eventually(
            lambda: {msg_id for msg_id, _ in rows()} >= set(stored.values()),
            60,
            "the queue to drain",
        )
        in_database = rows()
        ids = [msg_id for msg_id, _ in in_database]
        self.assertEqual(len(ids), len(set(ids)), "no message twice")
        self.assertLessEqual(set(stored.values()), set(ids), "every stored id is in the table")
        # A message the node had taken but whose "stored" never reached alice before
        # the kill is sent again after the restart; the restarted node's dedup memory
        # (the memory state store) is gone, so the resend is a second row under a new
        # id with the same sender sequence, which bob's client drops (P2).
        resent = len(in_database) - len({content for _, content in in_database})

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
            f"{len(stored)} stored, {len(in_database)} rows ({resent} resent after the "
            f"restart), {len(shown)} shown to bob once each"
        )


def _delete_plain_queues(amqp_url: str, queues: list[str]) -> None:
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    except Exception:
        return
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
    finally:
        connection.close()
