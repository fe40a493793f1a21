"""The path of an offline message from the switchboard to ``offline_msgs``.

The design (中间件的设计, 离线消息) puts RabbitMQ in front of the database: storing
offline messages is high-throughput work that could swamp the database, so a node
only publishes them to a durable queue, and a consumer writes them to the database at
its own pace (有节奏地存储到DB). The sender hears "stored" (the forged ack:N) once the
broker has confirmed the message: from then on it must never be lost, so

- the queue is durable and the messages persistent, and the writer acknowledges them
  to RabbitMQ only after the transaction that stores them has committed: a crash in
  between redelivers them, and the unique (receiver, msg_id) makes the second write
  harmless;
- the writer ignores the per-user cap (a confirmed message is not refused later), and
  a database that fails is retried for as long as it takes, holding the messages
  rather than handing them back to the broker's redelivery limit;
- the cap is enforced before publishing, against the database's count. Messages still
  in the queue are not counted, so a burst may overshoot the cap a little; it never
  drops anything;
- the broker's memory stays bounded by the queue's ``x-max-length`` with
  ``x-overflow = reject-publish``: beyond it the broker nacks, and the sender is told
  the message was not stored.

With the embedded backend (``[queue] backend = memory``) there is no broker: ``store``
writes through to the database, as the switchboard did before the pipeline existed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from twisted.internet import defer
from twisted.internet.defer import Deferred, FirstError, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.bus import describe
from cim.backends.bus.amqp_link import AmqpLink
from cim.backends.bus.broker import Queue
from cim.config import CimConfig
from cim.interfaces import BusUnavailable
from cim.offline.store import OfflineItem, OfflinePage, OfflineStore, SenderCount
from cim.protocols import cim_pb2
from cim.storage.database import Database
from cim.storage.offline import OfflineFull
from cim.storage.schema import offline_msgs

__all__ = [
    "DEFAULT_QUEUE",
    "OfflinePipeline",
    "OfflineWriter",
    "decode",
    "encode",
    "make_offline_pipeline",
]

DEFAULT_QUEUE = "cim.offline"
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 10.0
"""Seconds between attempts to write a batch while the database fails."""

_VERSION = 1
_HEADER = struct.Struct(">BH")  # framing version, receiver length
_MAX_MSG_ID = (1 << 63) - 1
_CHUNK = 500

_log = Logger(namespace="cim.offline_pipeline")

OnStored = Callable[[list[str]], Any]
"""Told the receivers of each committed batch, e.g. ``Switchboard.stored_for``."""


class ItemStore(Protocol):
    """Where the writer puts a batch: ``OfflineStore.store`` without a cap."""

    def store(self, messages: Iterable[OfflineItem]) -> Deferred[int]: ...


# --- framing --------------------------------------------------------------------------


def _pair(item: OfflineItem) -> tuple[str, cim_pb2.Message]:
    """Checked here, before publishing: a message the database would refuse must be
    refused to its sender, not discovered by the writer after the confirm."""
    if isinstance(item, tuple):
        receiver, message = item
    else:
        receiver, message = item.to, item
    if not receiver or not getattr(message, "from"):
        raise ValueError(f"message {message.id} has no receiver or no sender")
    if not 0 < message.id <= _MAX_MSG_ID:
        raise ValueError(f"message id {message.id} is not a server message id")
    return receiver, message


def encode(receiver: str, message: cim_pb2.Message) -> bytes:
    """The queue's message body: a version byte, the receiver, the Message.

    The receiver travels outside the Message because a group member's copy is the
    group message itself (its ``to`` is empty).
    """
    name = receiver.encode()
    if len(name) > 0xFFFF:
        raise ValueError("receiver name too long")
    return _HEADER.pack(_VERSION, len(name)) + name + message.SerializeToString(deterministic=True)


def decode(body: bytes) -> tuple[str, cim_pb2.Message]:
    """Raises ValueError for a body ``encode`` did not make."""
    if len(body) < _HEADER.size:
        raise ValueError("offline queue message too short")
    version, length = _HEADER.unpack_from(body)
    if version != _VERSION:
        raise ValueError(f"offline queue message of unknown version {version}")
    end = _HEADER.size + length
    if len(body) < end:
        raise ValueError("offline queue message truncated")
    try:
        receiver = body[_HEADER.size : end].decode()
        message = cim_pb2.Message.FromString(body[end:])
    except Exception as exc:
        raise ValueError(f"undecodable offline queue message: {exc}") from None
    return _pair((receiver, message))


def _counts_txn(connection: Connection, receivers: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for start in range(0, len(receivers), _CHUNK):
        rows = connection.execute(
            select(offline_msgs.c.receiver_uid, func.count())
            .where(offline_msgs.c.receiver_uid.in_(receivers[start : start + _CHUNK]))
            .group_by(offline_msgs.c.receiver_uid)
        ).all()
        counts.update((receiver, int(count)) for receiver, count in rows)
    return counts


def _queue_declaration(name: str, max_queued: int) -> Queue:
    return Queue(name, arguments=(("x-max-length", max_queued), ("x-overflow", "reject-publish")))


# --- the writer -----------------------------------------------------------------------


@dataclass(eq=False)
class _Delivery:
    receiver: str
    message: cim_pb2.Message
    done: Deferred[None]


class OfflineWriter:
    """Consumes the offline queue and stores it in batches, acknowledging after commit.

    A batch is written when ``batch_size`` messages are waiting or when the oldest has
    waited ``batch_wait`` seconds, one batch at a time: that is the pace the database
    sees, however fast messages are published. The prefetch window is twice the batch,
    so the next batch fills while one commits. Several writers (on several nodes) may
    consume the same queue.
    """

    def __init__(
        self,
        link: AmqpLink,
        store: ItemStore,
        reactor: Any,
        *,
        queue: str = DEFAULT_QUEUE,
        max_queued: int = 1_000_000,
        batch_size: int = 200,
        batch_wait: float = 0.2,
        on_stored: OnStored | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._link = link
        self._store = store
        self._reactor = reactor
        self._queue = queue
        self._max_queued = max_queued
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.on_stored = on_stored
        self._waiting: list[_Delivery] = []
        self._timer: IDelayedCall | None = None
        self._overdue = False
        self._writing: Deferred[None] | None = None
        self._nap: tuple[IDelayedCall, Deferred[None]] | None = None
        self._running = False
        self._consuming = False
        self.batches_written = 0

    @property
    def pending(self) -> int:
        """Messages taken from the queue and not yet committed."""
        return len(self._waiting)

    def start(self) -> None:
        """Consume from now on (on every connection of the link)."""
        self._running = True
        if not self._consuming:
            self._consuming = True
            self._link.declare(_queue_declaration(self._queue, self._max_queued)).addErrback(
                lambda _: None  # the link logs it and declares again on reconnecting
            )
            self._link.consume(self._queue, self._received, prefetch=2 * self.batch_size)

    def stop(self) -> Deferred[None]:
        """Finish the batch being written (its commit and acks), write nothing more.

        What is waiting stays unacknowledged: closing the link's connection hands it
        back to the broker for another writer or the next start.
        """
        self._running = False
        _cancel(self._timer)
        self._timer = None
        if self._nap is not None:
            call, woken = self._nap
            _cancel(call)
            if not woken.called:
                woken.callback(None)
        writing = self._writing
        if writing is None:
            return succeed(None)
        d: Deferred[None] = Deferred()

        def finished(result: object) -> object:
            d.callback(None)
            return result

        writing.addBoth(finished)
        return d

    def _received(self, body: bytes) -> Deferred[None]:
        try:
            receiver, message = decode(body)
        except ValueError as exc:
            # Never storable: the link's poison rule drops it after repeated failures,
            # with an error naming the queue.
            return fail(exc)
        delivery = _Delivery(receiver, message, Deferred())
        if not self._running:
            return delivery.done  # never acknowledged: the broker gets it back on close
        self._waiting.append(delivery)
        self._schedule()
        return delivery.done

    def _schedule(self) -> None:
        """The wait counts from the oldest waiting message, also while a batch commits."""
        if not self._running or not self._waiting:
            return
        if self._writing is None and (self._overdue or len(self._waiting) >= self.batch_size):
            self._write()
        elif self._timer is None and not self._overdue:
            self._timer = self._reactor.callLater(self.batch_wait, self._due)

    def _due(self) -> None:
        self._timer = None
        self._overdue = True
        self._schedule()

    def _write(self) -> None:
        _cancel(self._timer)
        self._timer = None
        self._overdue = False
        batch = self._waiting[: self.batch_size]
        del self._waiting[: self.batch_size]
        if self._waiting:  # the rest has waited a while already; close enough
            self._timer = self._reactor.callLater(self.batch_wait, self._due)
        self._writing = Deferred.fromCoroutine(self._commit(batch))
        self._writing.addErrback(_log_failure, "offline writer: unexpected failure")
        self._writing.addBoth(self._written)

    def _written(self, _: object) -> None:
        self._writing = None
        self._schedule()

    async def _commit(self, batch: list[_Delivery]) -> None:
        failures = 0
        while True:
            try:
                await self._store.store([(d.receiver, d.message) for d in batch])
                break
            except Exception as exc:
                failures += 1
                if not self._running:
                    # Unacknowledged: redelivered to whoever consumes next.
                    _log.warn(
                        "offline writer: stopping with {count} messages unwritten ({why})",
                        count=len(batch),
                        why=str(exc) or repr(exc),
                    )
                    return
                delay = min(MAX_RETRY_DELAY, FIRST_RETRY_DELAY * 2 ** min(failures - 1, 10))
                _log.warn(
                    "offline writer: storing {count} messages failed ({why}); "
                    "retrying in {delay:g} s",
                    count=len(batch),
                    why=str(exc) or repr(exc),
                    delay=delay,
                )
                await self._sleep(delay)
                if not self._running:
                    return
        self.batches_written += 1
        for delivery in batch:
            delivery.done.callback(None)  # the link acknowledges each now
        if self.on_stored is not None:
            receivers = sorted({d.receiver for d in batch})
            maybeDeferred(self.on_stored, receivers).addErrback(
                _log_failure, "offline writer: telling receivers to pull failed"
            )

    def _sleep(self, seconds: float) -> Deferred[None]:
        """A pause ``stop`` can cut short."""
        woken: Deferred[None] = Deferred()

        def wake() -> None:
            if not woken.called:
                woken.callback(None)

        call = self._reactor.callLater(seconds, wake)
        self._nap = (call, woken)

        def awake(_: None) -> None:
            self._nap = None

        return woken.addCallback(awake)


def _log_failure(failure: Failure, what: str) -> None:
    _log.failure(what, failure)


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


# --- the pipeline ---------------------------------------------------------------------


class OfflinePipeline:
    """The switchboard's offline box: ``store`` into the pipeline, reads from the DB.

    Without a link it writes through to ``store`` (the embedded backend). With one it
    publishes to the durable queue ``queue`` and fires after the broker's confirm; a
    writer, if given, is started and stopped with the pipeline.
    """

    def __init__(
        self,
        store: OfflineStore,
        db: Database,
        *,
        link: AmqpLink | None = None,
        own_link: bool = False,
        queue: str = DEFAULT_QUEUE,
        max_queued: int = 1_000_000,
        writer: OfflineWriter | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self._store = store
        self._db = db
        self.link = link
        self._own_link = own_link
        self._queue = queue
        self.writer = writer
        self._start_timeout = start_timeout
        if link is not None:
            link.declare(_queue_declaration(queue, max_queued)).addErrback(lambda _: None)

    @property
    def on_stored(self) -> OnStored | None:
        return self.writer.on_stored if self.writer is not None else None

    @on_stored.setter
    def on_stored(self, callback: OnStored | None) -> None:
        """Set after construction: the switchboard that receives it needs the pipeline."""
        if self.writer is not None:
            self.writer.on_stored = callback

    def start(self) -> Deferred[None]:
        """Fails with BusUnavailable when an owned link cannot reach RabbitMQ in time."""
        if self.writer is not None:
            self.writer.start()
        if self.link is not None and self._own_link:
            return self.link.start(self._start_timeout)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Before the database stops: the writer's last commit needs it."""
        d = self.writer.stop() if self.writer is not None else succeed(None)
        if self.link is not None and self._own_link:
            link = self.link
            d.addCallback(lambda _: link.stop())
        return d

    @property
    def pending(self) -> int | None:
        """What this node's writer holds uncommitted; None when it runs none."""
        return self.writer.pending if self.writer is not None else None

    # --- OfflineBox -------------------------------------------------------------------

    def store(self, messages: Iterable[OfflineItem], *, capped: bool = True) -> Deferred[int]:
        """Fires once every message is safe: committed, or confirmed by the broker.

        Fails with ``OfflineFull`` (nothing published) when a receiver's box is full
        (unless ``capped`` is False: the writer stores whatever the cap anyway),
        with BusUnavailable when the broker did not confirm every message (some may
        have been: the sender is told "failed" for a message a receiver may still get,
        never "stored" for one it will not). With the broker the result is how many
        messages were queued, not how many rows are new.
        """
        items = list(messages)
        if self.link is None:
            return self._store.store(items, capped=capped)
        try:
            pairs = [_pair(item) for item in items]
            bodies = [encode(receiver, message) for receiver, message in pairs]
        except ValueError as exc:
            return fail(exc)
        if not pairs:
            return succeed(0)
        return Deferred.fromCoroutine(self._publish([r for r, _ in pairs], bodies, capped))

    async def _publish(self, receivers: list[str], bodies: list[bytes], capped: bool) -> int:
        limit = self._store.max_per_user if capped else None
        if limit is not None:
            adding: dict[str, int] = {}
            for receiver in receivers:
                adding[receiver] = adding.get(receiver, 0) + 1
            counts = await self._db.run(_counts_txn, sorted(adding))
            over = sorted(r for r, n in adding.items() if counts.get(r, 0) + n > limit)
            if over:
                raise OfflineFull(over, limit)
        assert self.link is not None
        link = self.link
        try:
            await defer.gatherResults(
                [link.publish("", self._queue, body, mandatory=True) for body in bodies],
                consumeErrors=True,
            )
        except FirstError as error:
            failure: Failure = error.subFailure
            if failure.check(BusUnavailable):
                failure.raiseException()
            raise BusUnavailable(f"offline queue: {describe(failure)}") from None
        return len(bodies)

    def page(
        self, receiver: str, before: int | None = None, limit: int = 100
    ) -> Deferred[OfflinePage]:
        return self._store.page(receiver, before, limit)

    def acknowledge(self, receiver: str, msg_ids: Iterable[int]) -> Deferred[int]:
        return self._store.acknowledge(receiver, msg_ids)

    def summary(self, receiver: str) -> Deferred[list[SenderCount]]:
        return self._store.summary(receiver)


def make_offline_pipeline(
    config: CimConfig,
    db: Database,
    reactor: Any,
    *,
    link: AmqpLink | None = None,
    on_stored: OnStored | None = None,
) -> OfflinePipeline:
    """The pipeline ``[queue] backend`` and ``[offline]`` describe, not yet started.

    With RabbitMQ and no ``link``, the pipeline
    opens a connection of its own (started and stopped with it); a link passed in,
    such as the node bus's, is the caller's to start and stop.
    """
    offline = config.offline
    store = OfflineStore(db, offline.max_per_user)
    if config.queue.backend != "rabbitmq":
        return OfflinePipeline(store, db)
    own_link = link is None
    if link is None:
        link = AmqpLink(
            reactor,
            config.queue.amqp_url,
            confirm_timeout=config.queue.confirm_timeout,
            name="offline pipeline",
            connection_name=f"cim offline {config.node.id}",
        )
    writer = None
    if offline.writer:
        writer = OfflineWriter(
            link,
            OfflineStore(db, None),  # confirmed messages are stored whatever the cap
            reactor,
            queue=offline.queue,
            max_queued=offline.max_queued,
            batch_size=offline.batch_size,
            batch_wait=offline.batch_wait,
            on_stored=on_stored,
        )
    return OfflinePipeline(
        store,
        db,
        link=link,
        own_link=own_link,
        queue=offline.queue,
        max_queued=offline.max_queued,
        writer=writer,
    )
