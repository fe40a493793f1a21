"""The archive pipeline and the history API (design: 用户的行为数据收集).

Every message a node takes responsibility for is also archived, so a new device can
catch up on a conversation and operators keep messages for the retention period.
Archiving must never slow down or break delivery: ``ArchivePipeline.archive`` is
fire-and-forget, and whatever goes wrong behind it is logged and counted, never
raised to the caller.

Two backends, following ``[queue] backend``:

- ``memory`` (the all-in-one daemon): messages are buffered in the process and
  written in batches, so a burst costs one transaction per batch rather than one per
  message. The buffer is bounded by backpressure, never by dropping history: once
  ``max_buffer`` messages wait (the database is down or slower than the traffic),
  ``behind`` tells the IM rooms to refuse new messages before they are taken (ERROR
  ``UNAVAILABLE`` with a retry-after, ``cim.limits.messages``) until the writer has
  caught up to half of it. Messages already taken are still archived, so the buffer
  may pass ``max_buffer`` by the messages in flight, never by a flood.
- ``rabbitmq``: messages are published persistent, with publisher confirms, to a
  durable queue (``cim.archive``). A consumer (on this node or any other with
  ``[archive] consume = true``) writes them in batches and acknowledges each message
  only after the batch's commit, so a crash between the two loses nothing; the second
  write of a redelivered message is a no-op (the history's primary key). A publish
  that fails (broker away, no confirm in time) falls back to the in-process writer,
  so a broker outage does not open a hole in the history.

The batching and the retries are ``cim.backends.batching.BatchWriter``'s; the queue
is declared through ``cim.backends.bus.broker``, which imports no pika.

The retention purge runs on a ``LoopingCall`` here too, because it is the same
operational concern (the size of the history table) and needs the same pool.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from sqlalchemy.exc import DataError, IntegrityError
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.backends.batching import BatchWriter
from cim.backends.bus.broker import BrokerLink, Queue
from cim.config import CimConfig
from cim.history.store import (
    HistoryForbidden,
    HistoryPage,
    HistoryStore,
    IsGroupMember,
    direct_conversation,
    group_conversation,
)
from cim.offline.store import page_budget
from cim.protocols import cim_pb2
from cim.storage.schema import GROUP_ID_LENGTH, USER_NAME_MAX

__all__ = [
    "ARCHIVE_QUEUE",
    "DEFAULT_HISTORY_LIMIT",
    "MAX_HISTORY_LIMIT",
    "ArchivePipeline",
    "HistoryService",
    "archive_from_config",
    "unarchivable",
]

ARCHIVE_QUEUE = "cim.archive"
DEFAULT_HISTORY_LIMIT = 50
MAX_HISTORY_LIMIT = 200
"""Messages per HISTORY_A; the page is also bounded in bytes (``page_budget``)."""

DEFAULT_BATCH_SIZE = 500
DEFAULT_BATCH_WAIT = 1.0
DEFAULT_PURGE_INTERVAL = 3600.0
BEHIND_RETRY = 1.0
"""Seconds a sender is asked to wait while the archive catches up."""
RETRY = Backoff(0.5, 30.0)
"""Seconds between attempts to write a batch while the database fails."""

_MAX_MSG_ID = (1 << 63) - 1
_PERMANENT = (ValueError, DataError, IntegrityError)
"""Write failures that the same rows will always hit again (unlike a database that is
down or busy): the batch is split to find the culprit instead of being retried."""

_log = Logger(namespace="cim.archive")


def unarchivable(message: cim_pb2.Message) -> str | None:
    """Why the history table could never hold this message, or None if it can.

    Checked before a message joins a batch: one bad message must not fail the
    transaction of the hundreds of good ones around it, again and again.
    """
    sender = getattr(message, "from")
    if not 0 < message.id <= _MAX_MSG_ID:
        return f"message id {message.id} is not a server message id"
    if not sender or not (message.group or message.to):
        return "the message has no sender, or neither a receiver nor a group"
    if len(sender) > USER_NAME_MAX or len(message.to) > USER_NAME_MAX:
        return "a user name is longer than the database allows"
    if len(message.group) > GROUP_ID_LENGTH:
        return "the group id is longer than the database allows"
    return None


@dataclass(frozen=True, slots=True)
class _Item:
    message: cim_pb2.Message
    from_broker: bool = False
    """A broker delivery, acknowledged after the commit; else taken in this process."""


class ArchivePipeline:
    """Gets every message into the history table without holding up delivery.

    ``link`` is the node's ``AmqpLink`` (``RabbitMqBus.link``) for the ``rabbitmq``
    backend and None for ``memory``. ``writer`` runs the queue's consumer on this
    node; a node that only publishes leaves the writing to others. ``purge_interval``
    of 0 disables the retention purge here (one node of a cluster is enough).

    ``counts`` holds plain counters for metrics: ``archived`` (messages committed),
    ``new_rows``, ``published``, ``publish_failed``, ``fallback`` (written directly
    after a failed publish), ``write_failed`` (failed transactions), ``rejected``
    (messages that can never be archived), ``dropped`` (lost to a failed final flush,
    or taken after the archive stopped), ``behind`` (times new messages were held back
    because the buffer was full), ``purged``.
    """

    def __init__(
        self,
        backend: str,
        history: HistoryStore,
        link: BrokerLink | None,
        reactor: IReactorTime,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_wait: float = DEFAULT_BATCH_WAIT,
        *,
        purge_interval: float = DEFAULT_PURGE_INTERVAL,
        queue: str = ARCHIVE_QUEUE,
        writer: bool = True,
        max_buffer: int | None = None,
    ) -> None:
        if backend not in ("memory", "rabbitmq"):
            raise ValueError(f"unknown archive backend {backend!r}")
        if backend == "rabbitmq" and link is None:
            raise ValueError("the rabbitmq backend needs the node's AMQP link")
        if batch_size < 1 or batch_wait < 0 or purge_interval < 0:
            raise ValueError(
                "batch_size must be positive, batch_wait and purge_interval not negative"
            )
        self.backend = backend
        self._history = history
        self._link = link if backend == "rabbitmq" else None
        self._reactor = reactor
        self._batch_size = batch_size
        self._purge_interval = purge_interval
        self.queue = queue
        self._writer = writer
        self._max_buffer = max_buffer if max_buffer is not None else 100 * batch_size
        self.counts: Counter[str] = Counter()
        self._batches: BatchWriter[_Item] = BatchWriter(
            reactor,
            self._write,
            name="archive",
            log=_log,
            batch_size=batch_size,
            batch_wait=batch_wait,
            retry=RETRY,
            permanent=_PERMANENT,
            on_written=self._written,
            on_failure=self._write_failed,
            on_rejected=self._refused,
            on_abandoned=self._give_up,
        )
        self._publishing: set[Deferred[None]] = set()
        self._publish_failing = False
        self._behind = False
        self._stopping = False
        self._purge: LoopingCall | None = None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Declare the queue and start consuming (rabbitmq), and start the purge.

        The node's link must be started by its owner (the bus); a declaration it
        cannot make now is made on its next connection, so this never fails.
        """
        ready: Deferred[None] = succeed(None)
        if self._link is not None:
            ready = self._link.declare(Queue(self.queue))
            ready.addErrback(self._declare_failed)
            if self._writer:
                # Twice a batch: one batch can fill while the previous one commits.
                self._link.consume(self.queue, self._consumed, prefetch=2 * self._batch_size)
        if self._purge_interval and self._history.retention_days is not None:
            self._purge = LoopingCall(self.purge)
            self._purge.clock = self._reactor
            self._purge.start(self._purge_interval, now=True)
        return ready

    def _declare_failed(self, failure: Failure) -> None:
        _log.warn(
            "archive: could not declare queue {queue!r} now ({why}); publishes fall back "
            "to direct writes until it exists",
            queue=self.queue,
            why=failure.getErrorMessage(),
        )

    def stop(self) -> Deferred[None]:
        """Stop taking messages and write what is buffered; fires when it is committed.

        Call before stopping the database and the link. Deliveries still arriving from
        the broker are left unacknowledged: the broker gives them to the next consumer.
        """
        self._stopping = True
        if self._purge is not None and self._purge.running:
            self._purge.stop()
        self._purge = None
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        # A publish that fails now still falls back to the in-process writer.
        while self._publishing:
            await defer.DeferredList(list(self._publishing))
        await self._batches.stop(flush=True)

    # --- the hot path -----------------------------------------------------------------

    def behind(self) -> float:
        """Seconds new messages should wait: 0.0 while the archive keeps up.

        Full at ``max_buffer`` messages waiting (in the buffer or being published);
        it stays full until half of that is written, so senders are not let in and out
        one message at a time.
        """
        waiting = self._batches.pending + len(self._publishing)
        if self._behind:
            if waiting >= self._max_buffer // 2:
                return BEHIND_RETRY
            self._behind = False
            _log.info(
                "archive: caught up ({count} messages wait); taking messages again", count=waiting
            )
            return 0.0
        if waiting < self._max_buffer:
            return 0.0
        self._behind = True
        self.counts["behind"] += 1
        _log.warn(
            "archive: {count} messages wait for the database; new messages are refused "
            "(UNAVAILABLE) until it catches up",
            count=waiting,
        )
        return BEHIND_RETRY

    def archive(self, message: cim_pb2.Message) -> None:
        """Archive a message some time soon; never raises and never waits.

        Call once per message the node took responsibility for (delivered, stored or
        accepted for a group: a group message once, not once per member).
        """
        try:
            self._archive(message)
        except Exception:
            # The caller is delivering a message: nothing here may get in its way.
            self.counts["dropped"] += 1
            _log.failure("archive: could not take message {id}", id=message.id)

    def _archive(self, message: cim_pb2.Message) -> None:
        if self._stopping:
            self.counts["dropped"] += 1
            _log.warn("archive: message {id} came after the archive stopped", id=message.id)
            return
        reason = unarchivable(message)
        if reason is not None:
            self._reject(message.id, reason)
            return
        if self._link is None:
            self._add(message)
            return
        d = self._link.publish(
            "", self.queue, message.SerializeToString(deterministic=True), mandatory=True
        )
        self._publishing.add(d)
        d.addCallbacks(self._published, self._publish_failed, errbackArgs=(message,))
        d.addBoth(lambda _: self._publishing.discard(d))

    def _published(self, _: object) -> None:
        self.counts["published"] += 1
        if self._publish_failing:
            self._publish_failing = False
            _log.info("archive: publishing to queue {queue!r} works again", queue=self.queue)

    def _publish_failed(self, failure: Failure, message: cim_pb2.Message) -> None:
        self.counts["publish_failed"] += 1
        self.counts["fallback"] += 1
        if not self._publish_failing:
            self._publish_failing = True
            _log.warn(
                "archive: cannot publish to queue {queue!r} ({why}); writing archived "
                "messages directly to the database meanwhile",
                queue=self.queue,
                why=failure.getErrorMessage(),
            )
        # Maybe the broker has it after all (a confirm that came too late): the
        # second write of the message is a no-op.
        self._add(message)

    def _reject(self, msg_id: int, reason: str) -> None:
        self.counts["rejected"] += 1
        _log.error("archive: message {id} cannot be archived: {why}", id=msg_id, why=reason)

    # --- the consumer -----------------------------------------------------------------

    def _consumed(self, body: bytes) -> Deferred[None]:
        if self._stopping:
            # Never acknowledged: the broker redelivers it once this connection closes.
            return Deferred()
        try:
            message = cim_pb2.Message.FromString(body)
        except DecodeError:
            self._reject(0, f"a {len(body)}-byte delivery is not a message")
            return succeed(None)  # acknowledged: it would fail the same way for ever
        reason = unarchivable(message)
        if reason is not None:
            self._reject(message.id, reason)
            return succeed(None)
        # Fires after the commit, which acknowledges it; kept unacknowledged while the
        # database is down: failing it would make the broker drop it after a few
        # redeliveries.
        return self._batches.add(_Item(message, from_broker=True))

    # --- batches ----------------------------------------------------------------------

    def _add(self, message: cim_pb2.Message) -> None:
        # Never dropped for load: ``behind`` keeps new messages out instead. Broker
        # deliveries are bounded by the prefetch window. A failed final flush is
        # counted by _give_up.
        self._batches.put(_Item(message))

    def _write(self, batch: list[_Item]) -> Deferred[int]:
        return self._history.archive([item.message for item in batch])

    def _written(self, batch: list[_Item], new_rows: int) -> None:
        self.counts["archived"] += len(batch)
        self.counts["new_rows"] += new_rows

    def _write_failed(self, batch: list[_Item], failure: Failure) -> None:
        self.counts["write_failed"] += 1

    def _refused(self, item: _Item, failure: Failure) -> None:
        """The database refuses this one message: acknowledged, never written."""
        self._reject(item.message.id, failure.getErrorMessage())

    def _give_up(self, batch: list[_Item], failure: Failure) -> None:
        """The final flush failed: what came through the broker is delivered again
        elsewhere, the rest is lost, and the operator is told how much."""
        lost = sum(1 for item in batch if not item.from_broker)
        self.counts["dropped"] += lost
        if lost:
            _log.error(
                "archive: {count} messages are missing from the history: the final write "
                "failed ({why})",
                count=lost,
                why=failure.getErrorMessage(),
            )

    # --- retention --------------------------------------------------------------------

    def purge(self) -> Deferred[None]:
        """One pass of the retention purge; failures are logged (the next pass retries)."""
        d = self._history.purge_expired()

        def purged(count: int) -> None:
            self.counts["purged"] += count
            if count:
                _log.info("archive: purged {count} messages past retention", count=count)

        def failed(failure: Failure) -> None:
            _log.warn("archive: the retention purge failed ({why})", why=failure.getErrorMessage())

        return d.addCallbacks(purged, failed)


def archive_from_config(
    config: CimConfig, history: HistoryStore, link: BrokerLink | None, reactor: IReactorTime
) -> ArchivePipeline | None:
    """The pipeline ``[archive]`` and ``[queue] backend`` describe; None if disabled."""
    if not config.archive.enabled:
        return None
    section = config.archive
    return ArchivePipeline(
        config.queue.backend,
        history,
        link,
        reactor,
        section.batch_size,
        section.batch_wait,
        purge_interval=section.purge_interval,
        queue=section.queue,
        writer=section.writer,
        max_buffer=section.max_buffer,
    )


# --- the history API ------------------------------------------------------------------


class HistoryService:
    """Answers HISTORY_R: a page of one of the reader's conversations, newest first.

    Only participants read: the 1:1 conversation is always the reader's own with
    ``peer``, and a group's needs ``is_group_member`` (current membership) to agree.
    A group the reader is not in and a group that does not exist get the same
    "forbidden", so the answer does not reveal which group ids exist. A page stays
    below ``max_page_bytes`` (the node's frame limit) and the reader's ``max_bytes``.
    """

    def __init__(
        self,
        history: HistoryStore,
        is_group_member: IsGroupMember | None,
        max_page_bytes: int = 65536,
    ) -> None:
        self._history = history
        self._is_group_member = is_group_member
        self._max_page_bytes = max_page_bytes

    def answer(self, user: str, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]:
        """Never fails: every refusal and error is an answer with ``error`` set."""
        if bool(request.peer) == bool(request.group):
            return succeed(_refusal("bad_request", "name exactly one of peer and group"))
        if request.group:
            conversation = group_conversation(request.group)
        else:
            conversation = direct_conversation(user, request.peer)
        limit = min(request.limit or DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT)
        # Above the largest id there is nothing more to skip: the newest page.
        before = request.before if 0 < request.before <= _MAX_MSG_ID else None
        budget = page_budget(self._max_page_bytes, request.max_bytes)
        d = self._history.page(
            user, conversation, before, limit, self._is_group_member, max_bytes=budget
        )
        return d.addCallbacks(_page_answer, self._failed, errbackArgs=(user, request))

    def _failed(self, failure: Failure, user: str, request: cim_pb2.HistoryR) -> cim_pb2.HistoryA:
        if failure.check(HistoryForbidden):
            what = f"group {request.group}" if request.group else "this conversation"
            return _refusal("forbidden", f"you are not a participant of {what}")
        _log.failure("history: could not answer {user}'s request", failure=failure, user=user)
        return _refusal("unavailable", "history is unavailable right now; try again later")


def _page_answer(page: HistoryPage) -> cim_pb2.HistoryA:
    return cim_pb2.HistoryA(
        messages=[cim_pb2.Message.FromString(record.payload) for record in page.records],
        more=page.more,
        next_before=page.next_before or 0,
    )


def _refusal(error: str, message: str) -> cim_pb2.HistoryA:
    return cim_pb2.HistoryA(error=error, message=message)
