"""cim.history.archive: the RabbitMQ archive pipeline against the machine's broker.

Each test uses a queue of its own (deleted afterwards) and a real database thread pool;
without a broker they skip (or fail with CIM_REQUIRE_SERVICES=1). The memory pipeline,
the purge and the history API are in tests/unit/test_archive.py.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from typing import Any

import pika
from cim.history.archive import ArchivePipeline
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from cim.backends.bus.amqp import parse_amqp_url
from cim.backends.bus.amqp_link import AmqpLink
from cim.history.store import HistoryStore, direct_conversation
from cim.storage.database import Database
from tests.integration.support.rabbitmq import SHARED_URL, amqp_answers
from tests.integration.support.services import eventually, service_missing
from tests.unit.test_archive import RecordingHistory
from tests.unit.test_offline import message
from tests.unit.test_storage import sqlite_url

# --- RabbitMQ --------------------------------------------------------------------------


class RabbitPipelineTests(TestCase):
    """Against the machine's broker, with a queue of the test's own."""

    timeout = 60

    def setUp(self) -> None:
        address = parse_amqp_url(SHARED_URL)
        if not amqp_answers(address.host, address.port):
            service_missing(self, "RabbitMQ", f"nothing speaks AMQP at {address}")
        self.queue = f"cimtest-{uuid.uuid4().hex[:10]}.archive"
        self.addCleanup(self.delete_queue)
        self.db = Database(sqlite_url(self), reactor, threads=1)
        self.store = HistoryStore(self.db, retention_days=None, clock=reactor)

    async def start(self) -> None:
        await self.db.start()
        self.addCleanup(self.db.stop)

    async def link(self) -> AmqpLink:
        link = AmqpLink(
            reactor, SHARED_URL, confirm_timeout=5.0, reconnect_delay=0.1, max_reconnect_delay=0.5
        )
        self.addCleanup(link.stop)
        await link.start()
        return link

    def delete_queue(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(SHARED_URL))
        try:
            connection.channel().queue_delete(self.queue)
        finally:
            connection.close()

    def depth(self) -> int:
        """Ready (not delivered, or returned) messages, asked of the broker directly."""
        connection = pika.BlockingConnection(pika.URLParameters(SHARED_URL))
        try:
            frame = connection.channel().queue_declare(self.queue, passive=True)
            count: int = frame.method.message_count
            return count
        finally:
            connection.close()

    async def until(self, check: Callable[[], Any], what: str) -> None:
        async def holds() -> bool:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            return bool(result)

        await eventually(reactor, holds, 20.0, what)

    async def stored(self) -> list[int]:
        page = await self.store.page("alice", direct_conversation("alice", "bob"), limit=1000)
        return [r.msg_id for r in page.records]

    async def test_archived_messages_reach_the_database_and_leave_the_queue(self) -> None:
        await self.start()
        link = await self.link()
        pipeline = ArchivePipeline(
            "rabbitmq", self.store, link, reactor, batch_size=10, batch_wait=0.05, queue=self.queue
        )
        await pipeline.start()
        for msg_id in range(1, 26):
            pipeline.archive(message(msg_id))

        async def all_stored() -> bool:
            return len(await self.stored()) == 25

        await self.until(all_stored, "25 archived rows")
        await pipeline.stop()
        self.assertEqual(pipeline.counts["published"], 25)
        self.assertEqual(pipeline.counts["fallback"], 0)
        self.assertEqual(await self.stored(), list(range(25, 0, -1)))
        await link.stop()
        self.assertEqual(self.depth(), 0)  # every message was acknowledged

    async def test_messages_are_acknowledged_only_after_the_commit(self) -> None:
        await self.start()
        history = RecordingHistory(self.store)
        history.held = []
        link = await self.link()
        pipeline = ArchivePipeline(
            "rabbitmq",
            history,  # type: ignore[arg-type]
            link,
            reactor,
            batch_size=5,
            batch_wait=0.05,
            queue=self.queue,
        )
        await pipeline.start()
        for msg_id in range(1, 11):
            pipeline.archive(message(msg_id))
        await self.until(lambda: len(history.held or []) >= 1, "a write held")
        await self.until(lambda: self.depth() == 0, "the consumer to take every message")
        # The consumer crashes before the commit: nothing was acknowledged, so the
        # broker holds all ten again.
        await link.stop()
        await self.until(lambda: self.depth() == 10, "the ten messages back in the queue")
        self.assertEqual(await self.stored(), [])
        # A new consumer writes them (and acknowledges them after its commit).
        link2 = await self.link()
        pipeline2 = ArchivePipeline(
            "rabbitmq", self.store, link2, reactor, batch_size=5, batch_wait=0.05, queue=self.queue
        )
        await pipeline2.start()

        async def all_stored() -> bool:
            return len(await self.stored()) == 10

        await self.until(all_stored, "ten archived rows")
        await pipeline2.stop()
        await link2.stop()
        self.assertEqual(self.depth(), 0)
        history.held = None

    async def test_a_publish_only_node_leaves_the_writing_to_others(self) -> None:
        await self.start()
        link = await self.link()
        pipeline = ArchivePipeline(
            "rabbitmq", self.store, link, reactor, batch_wait=0.05, queue=self.queue, writer=False
        )
        await pipeline.start()
        for msg_id in (1, 2, 3):
            pipeline.archive(message(msg_id))
        await pipeline.stop()
        await link.stop()
        self.assertEqual(self.depth(), 3)
        self.assertEqual(await self.stored(), [])
