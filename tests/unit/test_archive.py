"""cim.archive: the archive pipeline (memory and RabbitMQ), the purge, the history API,
and `cim-client history`.

The memory pipeline and the history service run on a temporary SQLite file through a
synchronous runner, with a ``task.Clock``. The RabbitMQ tests use the machine's broker
(CIM_TEST_AMQP_URL) under a queue name of their own, deleted afterwards, and a real
database thread pool; without a broker they skip (or fail with CIM_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from contextlib import redirect_stdout
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError, OperationalError
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import TestCase

from cim.history.archive import ArchivePipeline, HistoryService
from cim.history.store import HistoryStore, direct_conversation
from cim.protocols import cim_pb2
from cim.scripts import client as cli
from tests.unit.test_bus_memory import LogCapture
from tests.unit.test_offline import DAY, GROUP, START, DatabaseMixin, message
from tests.unit.test_storage import sqlite_url

T = TypeVar("T")


def ids(messages: Iterable[cim_pb2.Message]) -> list[int]:
    return [m.id for m in messages]


class RecordingHistory:
    """A HistoryStore stand-in: records batches, fails on demand, or holds writes."""

    def __init__(self, real: HistoryStore | None = None) -> None:
        self.real = real
        self.batches: list[list[int]] = []
        self.fail_with: Callable[[list[cim_pb2.Message]], Exception | None] = lambda _: None
        self.held: list[tuple[list[cim_pb2.Message], Deferred[int]]] | None = None
        self.retention_days: float | None = None

    def archive(self, messages: Iterable[cim_pb2.Message]) -> Deferred[int]:
        batch = list(messages)
        self.batches.append(ids(batch))
        error = self.fail_with(batch)
        if error is not None:
            return fail(error)
        if self.held is not None:
            d: Deferred[int] = Deferred()
            self.held.append((batch, d))
            return d
        if self.real is not None:
            return self.real.archive(batch)
        return succeed(len(batch))

    def release(self) -> None:
        assert self.held is not None
        held, self.held = self.held, None
        for batch, d in held:
            assert self.real is not None
            self.real.archive(batch).chainDeferred(d)

    def purge_expired(self) -> Deferred[int]:
        return succeed(0)


class MemoryPipelineTests(DatabaseMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def setUp(self) -> None:
        super().setUp()
        self.store = HistoryStore(self.db, retention_days=None, clock=self.clock)
        self.history = RecordingHistory(self.store)

    def pipeline(self, **options: Any) -> ArchivePipeline:
        options.setdefault("batch_size", 3)
        options.setdefault("batch_wait", 1.0)
        pipeline = ArchivePipeline(
            "memory",
            self.history,  # type: ignore[arg-type]
            None,
            self.clock,
            **options,
        )
        self.ok(pipeline.start())
        return pipeline

    def stored(self, a: str = "alice", b: str = "bob") -> list[int]:
        page = self.ok(self.store.page(a, direct_conversation(a, b), limit=1000))
        return [r.msg_id for r in page.records]

    def test_full_batches_are_written_at_once_and_the_rest_after_the_wait(self) -> None:
        pipeline = self.pipeline()
        for msg_id in range(1, 8):
            pipeline.archive(message(msg_id))
        self.assertEqual(self.history.batches, [[1, 2, 3], [4, 5, 6]])
        self.assertEqual(self.stored(), [6, 5, 4, 3, 2, 1])
        self.clock.advance(0.9)
        self.assertEqual(self.stored(), [6, 5, 4, 3, 2, 1])
        self.clock.advance(0.1)
        self.assertEqual(self.history.batches[-1], [7])
        self.assertEqual(self.stored(), [7, 6, 5, 4, 3, 2, 1])
        self.assertEqual(pipeline.counts["archived"], 7)
        self.assertEqual(pipeline.counts["new_rows"], 7)

    def test_stop_flushes_what_is_buffered(self) -> None:
        pipeline = self.pipeline(batch_size=100, batch_wait=60.0)
        pipeline.archive(message(1))
        pipeline.archive(message(2, group=GROUP))
        self.assertEqual(self.history.batches, [])
        self.ok(pipeline.stop())
        self.assertEqual(self.history.batches, [[1, 2]])
        self.assertEqual(self.stored(), [1])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # After stop nothing is taken, and nothing raises into the caller.
        pipeline.archive(message(3))
        self.assertEqual(pipeline.counts["dropped"], 1)

    def test_stop_waits_for_the_write_in_progress(self) -> None:
        self.history.held = []
        pipeline = self.pipeline(batch_size=2)
        for msg_id in (1, 2, 3):
            pipeline.archive(message(msg_id))
        stopped = pipeline.stop()
        self.assertNoResult(stopped)
        self.history.release()
        self.ok(stopped)
        self.assertEqual(self.stored(), [3, 2, 1])

    def test_a_failing_database_is_retried_and_never_raises(self) -> None:
        down = True
        self.history.fail_with = lambda _: (
            OperationalError("INSERT", {}, Exception("database is locked")) if down else None
        )
        logs = LogCapture(self, "cim.archive")
        pipeline = self.pipeline(batch_size=2)
        pipeline.archive(message(1))
        pipeline.archive(message(2))  # the write fails; the caller notices nothing
        pipeline.archive(message(3))
        self.assertEqual(pipeline.counts["write_failed"], 1)
        self.assertEqual(len(logs.lines("warn")), 1)
        self.clock.advance(0.5)  # first retry, fails again
        self.assertEqual(pipeline.counts["write_failed"], 2)
        down = False
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.stored(), [3, 2, 1])
        self.assertEqual(pipeline.counts["archived"], 3)

    def test_a_full_buffer_holds_new_messages_back_and_drops_none(self) -> None:
        """Seen 5: a flood while the database lags must not cost anyone history. Past
        max_buffer the archive asks for backpressure (the IM rooms refuse new messages
        before taking them); what was taken is all archived once the database is back."""
        self.history.fail_with = lambda _: OperationalError("INSERT", {}, Exception("down"))
        logs = LogCapture(self, "cim.archive")
        pipeline = self.pipeline(batch_size=2, max_buffer=4)
        self.assertEqual(pipeline.behind(), 0.0)
        for msg_id in range(1, 4):
            pipeline.archive(message(msg_id))
        self.assertEqual(pipeline.behind(), 0.0)
        pipeline.archive(message(4))
        self.assertGreater(pipeline.behind(), 0.0)
        self.assertEqual(len(logs.lines("warn")), 2)  # the failed write, then "behind"
        # Messages already taken when it filled are still archived, never dropped.
        for msg_id in range(5, 8):
            pipeline.archive(message(msg_id))
        self.assertGreater(pipeline.behind(), 0.0)
        self.assertEqual(pipeline.counts["dropped"], 0)
        self.assertEqual(pipeline.counts["behind"], 1)
        self.history.fail_with = lambda _: None
        for _ in range(3):
            self.clock.advance(30)
        self.assertEqual(self.stored(), [7, 6, 5, 4, 3, 2, 1])
        self.assertEqual(pipeline.behind(), 0.0)
        caught_up = [e for e in logs.lines("info") if "caught up" in e["log_format"]]
        self.assertEqual(len(caught_up), 1)

    def test_messages_that_cannot_be_archived_are_rejected_alone(self) -> None:
        logs = LogCapture(self, "cim.archive")
        pipeline = self.pipeline(batch_size=2)
        pipeline.archive(message(1))
        pipeline.archive(message(0))  # no server id
        nameless = message(2)
        setattr(nameless, "from", "")
        pipeline.archive(nameless)
        pipeline.archive(message(3))
        self.assertEqual(pipeline.counts["rejected"], 2)
        self.assertEqual(len(logs.lines("error")), 2)
        self.assertEqual(self.stored(), [3, 1])

    def test_a_row_the_database_refuses_is_found_and_left_out(self) -> None:
        def refuse(batch: list[cim_pb2.Message]) -> Exception | None:
            if 2 in ids(batch):
                return IntegrityError("INSERT", {}, Exception("constraint"))
            return None

        self.history.fail_with = refuse
        logs = LogCapture(self, "cim.archive")
        pipeline = self.pipeline(batch_size=3)
        for msg_id in (1, 2, 3):
            pipeline.archive(message(msg_id))
        self.assertEqual(self.history.batches, [[1, 2, 3], [1], [2], [3]])
        self.assertEqual(self.stored(), [3, 1])
        self.assertEqual(pipeline.counts["rejected"], 1)
        self.assertEqual(len(logs.lines("error")), 1)

    def test_archiving_twice_is_harmless(self) -> None:
        pipeline = self.pipeline(batch_size=2)
        for msg_id in (1, 2, 1, 2):
            pipeline.archive(message(msg_id))
        self.assertEqual(pipeline.counts["archived"], 4)
        self.assertEqual(pipeline.counts["new_rows"], 2)
        self.assertEqual(self.stored(), [2, 1])


class FakeLink:
    """The AmqpLink surface: publishes succeed, fail, or are held."""

    def __init__(self) -> None:
        self.declared: list[Any] = []
        self.published: list[tuple[str, str, bytes]] = []
        self.consumers: list[tuple[str, Callable[[bytes], Any], int]] = []
        self.up = True

    def declare(self, *declarations: Any) -> Deferred[None]:
        self.declared.extend(declarations)
        return succeed(None)

    def publish(
        self, exchange: str, routing_key: str, body: bytes, *, mandatory: bool = True
    ) -> Deferred[None]:
        if not self.up:
            from cim.interfaces import BusUnavailable

            return fail(BusUnavailable("RabbitMQ is unreachable"))
        self.published.append((exchange, routing_key, body))
        return succeed(None)

    def consume(self, queue: str, consumer: Callable[[bytes], Any], prefetch: int = 0) -> None:
        self.consumers.append((queue, consumer, prefetch))


class RabbitPipelineUnitTests(DatabaseMixin, TestCase):
    """The rabbitmq backend's logic with a fake link: no broker needed."""

    def database_url(self) -> str:
        return sqlite_url(self)

    def setUp(self) -> None:
        super().setUp()
        self.store = HistoryStore(self.db, retention_days=None, clock=self.clock)
        self.history = RecordingHistory(self.store)
        self.link = FakeLink()
        self.pipeline = ArchivePipeline(
            "rabbitmq",
            self.history,  # type: ignore[arg-type]
            self.link,
            self.clock,
            batch_size=2,
            batch_wait=1.0,
            queue="q.archive",
        )
        self.ok(self.pipeline.start())

    def test_start_declares_and_consumes(self) -> None:
        (queue,) = self.link.declared
        self.assertEqual((queue.name, queue.durable), ("q.archive", True))
        ((name, _, prefetch),) = self.link.consumers
        self.assertEqual((name, prefetch), ("q.archive", 4))

    def test_archive_publishes_to_the_queue(self) -> None:
        self.pipeline.archive(message(1))
        ((exchange, key, body),) = self.link.published
        self.assertEqual((exchange, key), ("", "q.archive"))
        self.assertEqual(cim_pb2.Message.FromString(body), message(1))
        self.assertEqual(self.history.batches, [])  # the consumer writes

    def test_consumed_messages_are_acknowledged_after_the_commit(self) -> None:
        (_, consume, _) = self.link.consumers[0]
        self.history.held = []
        first = consume(message(1).SerializeToString())
        second = consume(message(2).SerializeToString())
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.history.release()
        self.ok(first)
        self.ok(second)
        self.assertEqual(self.history.batches, [[1, 2]])

    def test_consumer_holds_messages_while_the_database_is_down(self) -> None:
        (_, consume, _) = self.link.consumers[0]
        self.history.fail_with = lambda _: OperationalError("INSERT", {}, Exception("down"))
        acked = [consume(message(i).SerializeToString()) for i in (1, 2)]
        self.clock.advance(10)
        for d in acked:
            self.assertNoResult(d)  # not failed: the broker would drop it after retries
        self.history.fail_with = lambda _: None
        self.clock.advance(30)
        for d in acked:
            self.ok(d)

    def test_garbage_deliveries_are_acknowledged_and_counted(self) -> None:
        (_, consume, _) = self.link.consumers[0]
        LogCapture(self, "cim.archive")
        self.ok(consume(b"\xff\xff\xff"))
        self.assertEqual(self.pipeline.counts["rejected"], 1)

    def test_a_failed_publish_falls_back_to_writing_directly(self) -> None:
        logs = LogCapture(self, "cim.archive")
        self.link.up = False
        self.pipeline.archive(message(1))
        self.pipeline.archive(message(2))
        self.assertEqual(self.pipeline.counts["publish_failed"], 2)
        self.assertEqual(self.history.batches, [[1, 2]])
        self.assertEqual(len(logs.lines("warn")), 1)
        self.link.up = True
        self.pipeline.archive(message(3))
        self.assertEqual(self.pipeline.counts["published"], 1)

    def test_after_stop_deliveries_stay_unacknowledged(self) -> None:
        (_, consume, _) = self.link.consumers[0]
        self.ok(self.pipeline.stop())
        self.assertNoResult(consume(message(1).SerializeToString()))


class PurgeTests(DatabaseMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def test_purge_by_age_on_the_interval(self) -> None:
        store = HistoryStore(self.db, retention_days=2, clock=self.clock)
        self.ok(
            store.archive(
                [
                    message(1, sent_at=START - 3 * DAY),
                    message(2, sent_at=START - 1 * DAY),
                    message(3, sent_at=START),
                ]
            )
        )
        pipeline = ArchivePipeline("memory", store, None, self.clock, purge_interval=3600)
        self.ok(pipeline.start())  # purges at once
        self.assertEqual(pipeline.counts["purged"], 1)
        self.clock.advance(DAY + 3600)  # message 2 is past 2 days old now
        self.assertEqual(pipeline.counts["purged"], 2)
        page = self.ok(store.page("alice", direct_conversation("alice", "bob")))
        self.assertEqual([r.msg_id for r in page.records], [3])
        self.ok(pipeline.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_purge_without_retention_or_interval(self) -> None:
        store = HistoryStore(self.db, retention_days=None, clock=self.clock)
        pipeline = ArchivePipeline("memory", store, None, self.clock, purge_interval=3600)
        self.ok(pipeline.start())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        store = HistoryStore(self.db, retention_days=1, clock=self.clock)
        pipeline = ArchivePipeline("memory", store, None, self.clock, purge_interval=0)
        self.ok(pipeline.start())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_purge_is_logged_and_tried_again(self) -> None:
        calls: list[int] = []
        history = RecordingHistory()
        history.retention_days = 1

        def purge() -> Deferred[int]:
            calls.append(1)
            if len(calls) == 1:
                return fail(OperationalError("DELETE", {}, Exception("down")))
            return succeed(5)

        history.purge_expired = purge  # type: ignore[method-assign]
        logs = LogCapture(self, "cim.archive")
        pipeline = ArchivePipeline("memory", history, None, self.clock, purge_interval=60)  # type: ignore[arg-type]
        self.ok(pipeline.start())
        self.assertEqual(len(logs.lines("warn")), 1)
        self.clock.advance(60)
        self.assertEqual(pipeline.counts["purged"], 5)


class HistoryServiceTests(DatabaseMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def setUp(self) -> None:
        super().setUp()
        self.store = HistoryStore(self.db, retention_days=None, clock=self.clock)
        self.members = {GROUP: {"alice", "bob"}}
        self.service = HistoryService(
            self.store, lambda group, user: user in self.members.get(group, set())
        )
        batch = [
            message(i, *(("alice", "bob") if i % 2 else ("bob", "alice"))) for i in range(1, 61)
        ]
        batch += [message(100 + i, "carol", "bob") for i in range(3)]
        batch += [message(200 + i, "alice", group=GROUP) for i in range(5)]
        self.ok(self.store.archive(batch))

    def ask(self, user: str, **fields: Any) -> cim_pb2.HistoryA:
        return self.ok(self.service.answer(user, cim_pb2.HistoryR(**fields)))

    def test_pages_newest_first_with_the_default_limit(self) -> None:
        first = self.ask("bob", peer="alice")
        self.assertEqual((first.error, first.more), ("", True))
        self.assertEqual(ids(first.messages), list(range(60, 10, -1)))
        self.assertEqual(first.next_before, 11)
        second = self.ask("alice", peer="bob", before=first.next_before)
        self.assertEqual(ids(second.messages), list(range(10, 0, -1)))
        self.assertEqual((second.more, second.next_before), (False, 0))

    def test_pages_stay_below_the_frame_limit_and_the_readers_own(self) -> None:
        bomb = "\U0001f4a3" * 16_000
        self.ok(
            self.store.archive([message(300 + i, "carol", "dave", text=bomb) for i in range(3)])
        )
        answers = []
        before = 0
        while True:
            answer = self.ask("dave", peer="carol", before=before)
            answers.append(ids(answer.messages))
            self.assertLess(answer.ByteSize(), 65_536 - 64)  # type byte and tag fit too
            if not answer.more:
                break
            before = answer.next_before
        self.assertEqual(answers, [[302], [301], [300]])
        # A reader announcing a smaller frame gets smaller pages of small messages.
        small = self.ask("bob", peer="alice", limit=50, max_bytes=1024)
        self.assertLess(small.ByteSize(), 1024)
        self.assertGreater(len(small.messages), 1)
        self.assertTrue(small.more)

    def test_limit_is_capped(self) -> None:
        self.assertEqual(len(self.ask("bob", peer="alice", limit=7).messages), 7)
        self.ok(self.store.archive([message(1000 + i) for i in range(300)]))
        self.assertEqual(len(self.ask("bob", peer="alice", limit=100000).messages), 200)

    def test_a_huge_before_means_the_newest_page(self) -> None:
        answer = self.ask("alice", peer="bob", before=(1 << 64) - 1, limit=3)
        self.assertEqual(ids(answer.messages), [60, 59, 58])

    def test_a_user_reads_only_their_own_conversations(self) -> None:
        # carol asks about bob: she gets her conversation with bob, never alice's.
        answer = self.ask("carol", peer="bob")
        self.assertEqual(ids(answer.messages), [102, 101, 100])
        self.assertEqual(self.ask("dave", peer="alice").messages, [])

    def test_group_history_is_for_members(self) -> None:
        self.assertEqual(ids(self.ask("bob", group=GROUP).messages), [204, 203, 202, 201, 200])
        refused = self.ask("carol", group=GROUP)
        self.assertEqual(refused.error, "forbidden")
        self.assertEqual(refused.messages, [])
        self.assertIn("not a participant", refused.message)
        # A group that does not exist looks the same: no probing for group ids.
        self.assertEqual(self.ask("carol", group="z" * 26).error, "forbidden")
        # Membership is checked now, not when the message was sent.
        self.members[GROUP].discard("bob")
        self.assertEqual(self.ask("bob", group=GROUP).error, "forbidden")

    def test_exactly_one_of_peer_and_group(self) -> None:
        self.assertEqual(self.ask("bob").error, "bad_request")
        self.assertEqual(self.ask("bob", peer="alice", group=GROUP).error, "bad_request")

    def test_a_database_failure_is_an_answer_not_a_failure(self) -> None:
        self.ok(self.db.stop())
        answer = self.ask("bob", peer="alice")
        self.assertEqual(answer.error, "unavailable")
        self.assertTrue(self.flushLoggedErrors())


# --- the client ------------------------------------------------------------------------


class FakeHistoryClient:
    def __init__(self, pages: list[cim_pb2.HistoryA]) -> None:
        self.pages = pages
        self.requests: list[tuple[str, int, int, bool]] = []

    def history(
        self, target: str, limit: int = 50, before: int = 0, group: bool = False
    ) -> Deferred[cim_pb2.HistoryA]:
        self.requests.append((target, limit, before, group))
        return succeed(self.pages.pop(0))

    def group_request(self, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        return succeed(
            cim_pb2.GroupAnswer(ok=True, groups=[cim_pb2.GroupInfo(id=GROUP, name="team")])
        )


class HistoryCommandTests(TestCase):
    def test_parsing(self) -> None:
        parser = cli.build_parser()
        options = parser.parse_args(["--user", "bob", "history", "alice"])
        self.assertEqual(
            (options.command, options.peer, options.group, options.limit, options.before),
            ("history", "alice", False, 50, 0),
        )
        options = parser.parse_args(
            ["--user", "bob", "history", "team", "--group", "--limit", "5", "--before", "123"]
        )
        self.assertEqual(
            (options.peer, options.group, options.limit, options.before), ("team", True, 5, 123)
        )
        for bad in (["--limit", "0"], ["--limit", "x"], ["--before", "-1"]):
            with self.assertRaises(SystemExit), redirect_stdout(io.StringIO()):
                parser.parse_args(["--user", "bob", "history", "alice", *bad])

    def run_command(
        self, client: FakeHistoryClient, *args: str
    ) -> tuple[Any, list[dict[str, Any]]]:
        options = cli.build_parser().parse_args(["--user", "bob", "history", *args])
        out = io.StringIO()
        with redirect_stdout(out):
            d = defer.ensureDeferred(cli.history_command(client, options))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        return d, lines

    def test_prints_message_json_newest_first_across_pages(self) -> None:
        pages = [
            cim_pb2.HistoryA(
                messages=[message(i) for i in range(400, 200, -1)], more=True, next_before=201
            ),
            cim_pb2.HistoryA(
                messages=[message(i) for i in range(200, 150, -1)], more=True, next_before=151
            ),
        ]
        client = FakeHistoryClient(pages)
        d, lines = self.run_command(client, "alice", "--limit", "250")
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual([line["msg_id"] for line in lines], [str(i) for i in range(400, 150, -1)])
        self.assertEqual(lines[0]["from"], "alice")
        self.assertEqual(lines[0], json.loads(cli.message_json(message(400))))
        self.assertEqual(client.requests, [("alice", 200, 0, False), ("alice", 50, 201, False)])

    def test_group_by_name(self) -> None:
        client = FakeHistoryClient([cim_pb2.HistoryA(messages=[message(5, group=GROUP)])])
        d, lines = self.run_command(client, "team", "--group", "--before", "9")
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(lines[0]["group"], GROUP)
        self.assertEqual(client.requests, [(GROUP, 50, 9, True)])

    def test_a_refusal_exits_4_with_the_reason(self) -> None:
        client = FakeHistoryClient(
            [cim_pb2.HistoryA(error="forbidden", message="you are not a participant of group x")]
        )
        d, lines = self.run_command(client, "alice")
        error = self.failureResultOf(d, cli.ClientExit).value
        self.assertEqual(error.status, 4)  # refused, as every permission refusal
        self.assertIn("forbidden", error.message)
        self.assertIn("not a participant", error.message)
        self.assertEqual(lines, [])

    def test_history_unavailable_exits_1(self) -> None:
        client = FakeHistoryClient(
            [cim_pb2.HistoryA(error="unavailable", message="history is not kept on this node")]
        )
        d, _ = self.run_command(client, "alice")
        error = self.failureResultOf(d, cli.ClientExit).value
        self.assertEqual(error.status, 1)
        self.assertIn("unavailable", error.message)
