"""cim.offline.pipeline with RabbitMQ: the queue, the writer, and an outage.

The real reactor, a SQLite file on the database's thread pool, and RabbitMQ: the
machine's broker (each test under a queue of its own, deleted afterwards) or, for the
outage, a private node it can stop. Without RabbitMQ they skip, or fail when
CIM_REQUIRE_SERVICES=1. The tests with a fake link are in tests/unit/test_offline_pipeline.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pika
from cim.offline.pipeline import OfflinePipeline, make_offline_pipeline
from cim.storage.offline import OfflineFull
from twisted.internet import defer, reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cim.backends.backoff import Backoff
from cim.backends.bus.amqp import parse_amqp_url
from cim.interfaces import BusUnavailable
from cim.offline.store import OfflineItem, OfflineStore
from cim.storage.database import Database
from tests.integration.support.rabbitmq import SHARED_URL, amqp_answers, shared_rabbitmq
from tests.integration.support.services import eventually, service_missing
from tests.unit.test_offline import message
from tests.unit.test_offline_pipeline import (
    BASE_ID,
    RecordingStore,
    config_for,
    count_txn,
    rows_txn,
)
from tests.unit.test_storage import sqlite_url

# --- with RabbitMQ --------------------------------------------------------------------


class RabbitFixture(TestCase):
    timeout = 60
    url = SHARED_URL

    def setUp(self) -> None:
        self.check_broker()
        self.queue = f"cimtest-{uuid.uuid4().hex[:10]}.offline"
        self.addCleanup(self.delete_queue)

    def check_broker(self) -> None:
        address = parse_amqp_url(self.url)
        if not amqp_answers(address.host, address.port):
            service_missing(self, "RabbitMQ", f"nothing speaks AMQP at {address}")

    def delete_queue(self) -> None:
        address = parse_amqp_url(self.url)
        if not amqp_answers(address.host, address.port):
            return
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            connection.channel().queue_delete(self.queue)
        finally:
            connection.close()

    def depth(self) -> int:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            frame = connection.channel().queue_declare(self.queue, passive=True)
            count: int = frame.method.message_count
            return count
        finally:
            connection.close()

    async def database(self) -> Database:
        db = Database(sqlite_url(self), reactor)
        await db.start()
        self.addCleanup(db.stop)
        return db

    async def pipeline(
        self, db: Database, on_stored: Callable[[list[str]], Any] | None = None, **offline: Any
    ) -> OfflinePipeline:
        offline.setdefault("queue", self.queue)
        config = config_for(self, "rabbitmq", self.url, **offline)
        pipeline = make_offline_pipeline(config, db, reactor, on_stored=on_stored)
        assert pipeline.link is not None
        link: Any = pipeline.link
        link.connection.backoff = Backoff(0.1, 0.5, jitter=0.2)
        self.addCleanup(pipeline.stop)
        await pipeline.start()
        return pipeline

    async def until(self, check: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
        async def holds() -> bool:
            result = check()
            if isinstance(result, Deferred):
                result = await result
            return bool(result)

        await eventually(reactor, holds, timeout, what)


class RabbitPipelineTests(RabbitFixture):
    async def test_store_fires_after_the_confirm_and_the_writer_commits_later(self) -> None:
        db = await self.database()
        publisher = await self.pipeline(db, writer="false")
        await publisher.store([message(BASE_ID + 1), ("carol", message(BASE_ID + 2, group="g"))])
        self.assertEqual(self.depth(), 2)  # the confirm means the broker has them
        self.assertEqual(await db.run(count_txn), 0)
        told: list[list[str]] = []
        await self.pipeline(db, on_stored=told.append)  # a writer on another "node"
        await self.until(lambda: told, "the writer's commit")
        self.assertEqual(await db.run(rows_txn), [("bob", BASE_ID + 1), ("carol", BASE_ID + 2)])
        self.assertEqual(told, [["bob", "carol"]])
        await self.until(lambda: self.depth() == 0, "the acknowledgements")

    async def test_a_burst_is_written_in_batches(self) -> None:
        db = await self.database()
        pipeline = await self.pipeline(db, batch_size=10, batch_wait="100ms")
        assert pipeline.writer is not None
        store = RecordingStore(OfflineStore(db, None))
        pipeline.writer._store = store
        await defer.gatherResults([pipeline.store([message(BASE_ID + i)]) for i in range(1, 36)])
        await self.until(lambda: sum(store.batches) >= 35, "every message written")
        self.assertLessEqual(max(store.batches), 10)
        self.assertLess(len(store.batches), 35)
        self.assertEqual(await db.run(count_txn), 35)

    async def test_the_queue_length_limit_refuses_publishes(self) -> None:
        db = await self.database()
        pipeline = await self.pipeline(db, writer="false", max_queued=3)
        for i in range(1, 4):
            await pipeline.store([message(BASE_ID + i)])
        with self.assertRaises(BusUnavailable):
            await pipeline.store([message(BASE_ID + 4)])
        self.assertEqual(self.depth(), 3)

    async def test_the_cap_refuses_with_offline_full(self) -> None:
        db = await self.database()
        pipeline = await self.pipeline(db, max_per_user=2, writer="false")
        await OfflineStore(db, None).store([message(BASE_ID + 1), message(BASE_ID + 2)])
        with self.assertRaises(OfflineFull):
            await pipeline.store([message(BASE_ID + 3)])
        await pipeline.store([("carol", message(BASE_ID + 3))])
        self.assertEqual(self.depth(), 1)

    async def test_a_crash_between_commit_and_ack_redelivers_harmlessly(self) -> None:
        db = await self.database()
        first = await self.pipeline(db, batch_wait="50ms")
        assert first.writer is not None and first.link is not None
        inner = OfflineStore(db, None)
        written: list[int] = []
        hung: Deferred[int] = Deferred()

        # Released at the end, so that stopping this writer does not wait for ever.
        def release() -> None:
            if not hung.called:
                hung.callback(0)  # its acks go nowhere: the connection is closed

        self.addCleanup(release)

        class CrashAfterWrite:
            """Commits, then never lets the writer acknowledge (the process dies)."""

            def store(self, messages: Iterable[OfflineItem]) -> Deferred[int]:
                d = inner.store(messages)
                d.addCallback(written.append)
                return d.addCallback(lambda _: hung)

        first.writer._store = CrashAfterWrite()
        await first.store([message(BASE_ID + i) for i in range(1, 6)])
        await self.until(lambda: sum(written) == 5, "the first write")
        await first.link.stop()  # the crash: nothing was acknowledged
        await self.until(lambda: self.depth() == 5, "the messages back in the queue")

        second = await self.pipeline(db, batch_wait="50ms")
        writer = second.writer
        assert writer is not None
        await self.until(lambda: writer.batches_written >= 1, "the redelivery")
        await self.until(lambda: self.depth() == 0, "the acknowledgements")
        self.assertEqual(await db.run(rows_txn), [("bob", BASE_ID + i) for i in range(1, 6)])


class RabbitOutageTests(RabbitFixture):
    """Acceptance 3 of issue 5 for the component: the broker stopped during a burst."""

    timeout = 240

    def check_broker(self) -> None:
        self.broker = shared_rabbitmq(self)
        self.url = self.broker.url

    async def test_broker_stopped_during_a_burst(self) -> None:
        db = await self.database()
        pipeline = await self.pipeline(db, batch_size=20, batch_wait="50ms")
        outcomes: dict[int, bool | None] = {}
        self.errors: list[Failure] = []

        def send(msg_id: int) -> None:
            outcomes[msg_id] = None

            def refused(failure: Failure) -> None:
                failure.trap(BusUnavailable)
                outcomes[msg_id] = False

            d = pipeline.store([message(msg_id, sender=f"s{msg_id % 7}")])
            d.addCallbacks(lambda _: outcomes.__setitem__(msg_id, True), refused)
            d.addErrback(self.errors.append)

        async def burst(first: int, count: int) -> None:
            for i in range(first, first + count):
                send(BASE_ID + i)
                await task.deferLater(reactor, 0.005, lambda: None)

        sending = Deferred.fromCoroutine(burst(1, 600))
        await self.until(lambda: len(outcomes) >= 150, "the burst to be under way")
        stopping = threads.deferToThread(self.broker.stop)
        await sending
        await stopping
        await self.until(lambda: None not in outcomes.values(), "every store to settle")
        confirmed = sorted(i for i, ok in outcomes.items() if ok)
        refused = sorted(i for i, ok in outcomes.items() if not ok)
        self.assertEqual(self.errors, [])
        self.assertTrue(confirmed, "nothing was confirmed before the stop")
        self.assertTrue(refused, "nothing failed while the broker was away")

        await threads.deferToThread(self.broker.start)

        async def all_stored() -> bool:
            rows = await db.run(rows_txn)
            return {msg_id for _, msg_id in rows} >= set(confirmed)

        await eventually(reactor, all_stored, 60, "every confirmed message in the database")
        rows = await db.run(rows_txn)
        ids = [msg_id for _, msg_id in rows]
        self.assertEqual(len(ids), len(set(ids)))  # exactly once
        # Anything else in the table is a message whose confirm was lost with the
        # broker: stored although its sender heard "failed", never the reverse.
        self.assertLessEqual(set(ids) - set(confirmed), set(refused))
        await self.until(lambda: self.depth() == 0, "the queue to drain")
