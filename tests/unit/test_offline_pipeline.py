"""cim.offline.pipeline and cim.offline.writer: write-through, the RabbitMQ queue, the
batching writer, outages.

The unit tests drive the writer with a fake link and a ``task.Clock`` and run the
database synchronously. The integration tests use the real reactor, a SQLite file on
the database's thread pool, and RabbitMQ: the machine's broker (each test under a
queue of its own, deleted afterwards) or, for the outage, a private node it can stop.
Without RabbitMQ they skip, or fail when CIM_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cim.backends.bus.broker import Queue
from cim.config import CimConfig, load_config
from cim.interfaces import BusConsumer, BusUnavailable
from cim.offline.pipeline import OfflinePipeline, make_offline_pipeline
from cim.offline.queue import decode, encode
from cim.offline.store import OfflineItem, OfflineStore
from cim.offline.writer import OfflineWriter
from cim.storage.database import Database
from cim.storage.offline import OfflineFull
from cim.storage.schema import offline_msgs
from tests.integration.support.rabbitmq import SHARED_URL
from tests.unit.test_offline import START, message
from tests.unit.test_storage import run_now, sqlite_url

BASE_ID = 1 << 40


def rows_txn(connection: Connection) -> list[tuple[str, int]]:
    return [
        (row.receiver_uid, row.msg_id)
        for row in connection.execute(
            select(offline_msgs.c.receiver_uid, offline_msgs.c.msg_id).order_by(
                offline_msgs.c.msg_id
            )
        )
    ]


def count_txn(connection: Connection) -> int:
    return int(connection.execute(select(func.count()).select_from(offline_msgs)).scalar_one())


class FakeLink:
    """Records what the pipeline asks of an AmqpLink; the test plays the broker."""

    def __init__(self) -> None:
        self.declared: list[Any] = []
        self.consumers: list[tuple[str, BusConsumer, int]] = []
        self.published: list[tuple[str, str, bytes]] = []
        self.confirms: list[Deferred[None]] = []

    def declare(self, *declarations: Any) -> Deferred[None]:
        self.declared.extend(declarations)
        return succeed(None)

    def consume(self, queue: str, consumer: BusConsumer, prefetch: int = 256) -> None:
        self.consumers.append((queue, consumer, prefetch))

    def publish(
        self, exchange: str, routing_key: str, body: bytes, *, mandatory: bool = True
    ) -> Deferred[None]:
        self.published.append((exchange, routing_key, body))
        d: Deferred[None] = Deferred()
        self.confirms.append(d)
        return d

    def deliver(self, body: bytes) -> Deferred[None]:
        _queue, consumer, _prefetch = self.consumers[0]
        result = consumer(body)
        assert isinstance(result, Deferred)
        return result


class RecordingStore:
    """Passes batches on to a real store, remembering their sizes; can be told to fail."""

    def __init__(self, inner: OfflineStore) -> None:
        self.inner = inner
        self.batches: list[int] = []
        self.fail_next = 0

    def store(self, messages: Iterable[OfflineItem]) -> Deferred[int]:
        items = list(messages)
        if self.fail_next:
            self.fail_next -= 1
            return fail(RuntimeError("database down"))
        self.batches.append(len(items))
        return self.inner.store(items)


# --- no broker ------------------------------------------------------------------------


class FramingTests(TestCase):
    def test_round_trip_keeps_the_receiver_and_the_message(self) -> None:
        m = message(BASE_ID + 1, group="g1")
        receiver, back = decode(encode("carol", m))
        self.assertEqual(receiver, "carol")
        self.assertEqual(back, m)

    def test_foreign_bodies_are_refused(self) -> None:
        for body in (b"", b"\x02\x00\x01x", b"\x01\x00\x09ab"):
            self.assertRaises(ValueError, decode, body)


class SyncDatabase:
    def setUp(self) -> None:
        case: Any = self
        self.db = Database(sqlite_url(case), None, runner=run_now)
        case.successResultOf(self.db.start())
        case.addCleanup(self.db.stop)

    def rows(self) -> list[tuple[str, int]]:
        case: Any = self
        result: list[tuple[str, int]] = case.successResultOf(self.db.run(rows_txn))
        return result


class WriteThroughTests(SyncDatabase, TestCase):
    def test_memory_backend_writes_through_and_reads_back(self) -> None:
        pipeline = OfflinePipeline(OfflineStore(self.db, 2), self.db)
        self.assertEqual(
            self.successResultOf(pipeline.store([message(BASE_ID + 1), ("carol", message(2))])),
            2,
        )
        self.assertEqual(self.rows(), [("carol", 2), ("bob", BASE_ID + 1)])
        page = self.successResultOf(pipeline.page("bob"))
        self.assertEqual([r.msg_id for r in page.records], [BASE_ID + 1])
        self.assertEqual(self.successResultOf(pipeline.summary("bob"))[0].count, 1)
        self.assertEqual(self.successResultOf(pipeline.acknowledge("bob", [BASE_ID + 1])), 1)
        self.successResultOf(pipeline.store([message(BASE_ID + 2)]))
        self.successResultOf(pipeline.store([message(BASE_ID + 3)]))
        self.failureResultOf(pipeline.store([message(BASE_ID + 4)]), OfflineFull)

    def test_make_offline_pipeline_with_the_memory_backend_has_no_link(self) -> None:
        pipeline = make_offline_pipeline(config_for(self, "memory"), self.db, None)
        self.assertIsNone(pipeline.link)
        self.assertIsNone(pipeline.writer)


class QueuedStoreTests(SyncDatabase, TestCase):
    """The publishing side against a fake link."""

    def setUp(self) -> None:
        super().setUp()
        self.link = FakeLink()
        self.pipeline = OfflinePipeline(
            OfflineStore(self.db, 3),
            self.db,
            link=self.link,  # type: ignore[arg-type]
            queue="q",
            max_queued=50,
        )

    def test_the_queue_is_durable_bounded_and_rejects_publishes_beyond(self) -> None:
        self.assertEqual(
            self.link.declared,
            [Queue("q", arguments=(("x-max-length", 50), ("x-overflow", "reject-publish")))],
        )

    def test_store_fires_only_after_every_confirm(self) -> None:
        d = self.pipeline.store([("carol", message(BASE_ID + 1, group="g")), message(BASE_ID + 2)])
        self.assertNoResult(d)
        self.assertEqual([(e, k) for e, k, _ in self.link.published], [("", "q"), ("", "q")])
        self.assertEqual(decode(self.link.published[0][2])[0], "carol")
        self.link.confirms[0].callback(None)
        self.assertNoResult(d)
        self.link.confirms[1].callback(None)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(self.rows(), [])  # the writer's job

    def test_an_unconfirmed_message_fails_the_store(self) -> None:
        d = self.pipeline.store([message(BASE_ID + 1), message(BASE_ID + 2)])
        self.link.confirms[0].callback(None)
        self.link.confirms[1].errback(BusUnavailable("nack"))
        self.failureResultOf(d, BusUnavailable)

    def test_the_cap_refuses_before_publishing(self) -> None:
        self.successResultOf(
            OfflineStore(self.db, None).store([message(BASE_ID + i) for i in range(1, 3)])
        )
        # bob holds 2 of 3: one more fits, two do not; carol is fine.
        d = self.pipeline.store([message(BASE_ID + 10), ("carol", message(BASE_ID + 10))])
        self.link.confirms[0].callback(None)
        self.link.confirms[1].callback(None)
        self.successResultOf(d)
        self.successResultOf(OfflineStore(self.db, None).store([message(BASE_ID + 3)]))
        full = self.failureResultOf(
            self.pipeline.store([message(BASE_ID + 11), ("carol", message(BASE_ID + 11))]),
            OfflineFull,
        ).value
        self.assertEqual(full.receivers, ("bob",))
        self.assertEqual(len(self.link.published), 2)  # nothing more was published

    def test_malformed_messages_are_refused_before_publishing(self) -> None:
        self.failureResultOf(self.pipeline.store([message(0)]), ValueError)
        self.failureResultOf(self.pipeline.store([("", message(BASE_ID))]), ValueError)
        self.assertEqual(self.link.published, [])


class WriterTests(SyncDatabase, TestCase):
    """Batching, acknowledgement after commit and retries, on a Clock."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(START)
        self.link = FakeLink()
        self.store = RecordingStore(OfflineStore(self.db, None))
        self.told: list[list[str]] = []
        self.writer = OfflineWriter(
            self.link,  # type: ignore[arg-type]
            self.store,
            self.clock,
            queue="q",
            batch_size=3,
            batch_wait=0.5,
            on_stored=self.told.append,
        )
        self.writer.start()

    def body(self, i: int, to: str = "bob") -> bytes:
        return encode(to, message(BASE_ID + i, to=to))

    def test_consumes_the_queue_with_a_prefetch_of_two_batches(self) -> None:
        self.assertEqual([(q, p) for q, _, p in self.link.consumers], [("q", 6)])

    def test_a_full_batch_is_written_at_once_and_acknowledged_after_commit(self) -> None:
        acks = [self.link.deliver(self.body(i, to)) for i, to in ((1, "bob"), (2, "ann"))]
        self.assertEqual(self.store.batches, [])
        for ack in acks:
            self.assertNoResult(ack)
        acks.append(self.link.deliver(self.body(3)))
        self.assertEqual(self.store.batches, [3])
        for ack in acks:
            self.successResultOf(ack)
        self.assertEqual(len(self.rows()), 3)
        self.assertEqual(self.told, [["ann", "bob"]])

    def test_a_partial_batch_is_written_after_the_wait(self) -> None:
        ack = self.link.deliver(self.body(1))
        self.clock.advance(0.4)
        self.assertNoResult(ack)
        self.clock.advance(0.1)
        self.successResultOf(ack)
        self.assertEqual(self.store.batches, [1])

    def test_a_burst_is_cut_into_batches(self) -> None:
        acks = [self.link.deliver(self.body(i)) for i in range(1, 8)]
        self.clock.advance(0.5)
        self.assertEqual(self.store.batches, [3, 3, 1])
        for ack in acks:
            self.successResultOf(ack)

    def test_a_failing_database_is_retried_holding_the_messages(self) -> None:
        self.store.fail_next = 3
        acks = [self.link.deliver(self.body(i)) for i in range(1, 4)]
        for _ in range(3):
            for ack in acks:
                self.assertNoResult(ack)  # never handed back to the redelivery limit
            self.clock.advance(10)
        for ack in acks:
            self.successResultOf(ack)
        self.assertEqual(len(self.rows()), 3)

    def test_writing_the_same_message_twice_keeps_one_row(self) -> None:
        for _ in range(2):
            ack = self.link.deliver(self.body(1))
            self.clock.advance(0.5)
            self.successResultOf(ack)
        self.assertEqual(self.rows(), [("bob", BASE_ID + 1)])

    def test_an_undecodable_message_fails_alone(self) -> None:
        self.failureResultOf(self.link.deliver(b"junk"), ValueError)
        ack = self.link.deliver(self.body(1))
        self.clock.advance(0.5)
        self.successResultOf(ack)

    def test_stop_waits_for_the_batch_being_written_and_leaves_the_rest(self) -> None:
        self.store.fail_next = 1
        acks = [self.link.deliver(self.body(i)) for i in range(1, 5)]
        stopped = self.writer.stop()
        self.successResultOf(stopped)  # the retry pause was cut short
        for ack in acks:
            self.assertNoResult(ack)  # the broker gets them back when the link closes
        self.assertEqual(self.rows(), [])


def config_for(test: TestCase, backend: str, url: str = SHARED_URL, **offline: Any) -> CimConfig:
    lines = [
        "[node]",
        "id = t1",
        f"data_dir = {os.path.abspath(test.mktemp())}",
        "[queue]",
        f"backend = {backend}",
        f"amqp_url = {url}",
        "confirm_timeout = 3",
        "[offline]",
    ] + [f"{key} = {value}" for key, value in offline.items()]
    path = os.path.abspath(test.mktemp())
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")
    return load_config(path)
