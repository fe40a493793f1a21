"""The path of an offline message from the switchboard to ``offline_msgs``.

The design (中间件的设计, 离线消息) puts RabbitMQ in front of the database: storing
offline messages is high-throughput work that could swamp the database, so a node
only publishes them to a durable queue, and a consumer writes them to the database at
its own pace (有节奏地存储到DB). The sender hears "stored" (the forged ack:N) once the
broker has confirmed the message: from then on it must never be lost, so

- the queue is durable and the messages persistent, and the writer
  (``cim.offline.writer``) acknowledges them to RabbitMQ only after the transaction
  that stores them has committed;
- the cap is enforced before publishing, against the database's count. Messages still
  in the queue are not counted, so a burst may overshoot the cap a little; it never
  drops anything;
- the broker's memory stays bounded by the queue's ``x-max-length`` with
  ``x-overflow = reject-publish``: beyond it the broker nacks, and the sender is told
  the message was not stored.

With the embedded backend (``[queue] backend = memory``) there is no broker: ``store``
writes through to the database, as the switchboard did before the pipeline existed.
The broker's client (pika, whose Twisted adapter installs the default reactor) and
the writer are imported by ``make_offline_pipeline`` only when RabbitMQ is configured.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from twisted.internet import defer
from twisted.internet.defer import Deferred, FirstError, fail, succeed
from twisted.python.failure import Failure

from cim.backends.bus.broker import BrokerLink
from cim.backends.link import describe
from cim.config import CimConfig
from cim.interfaces import BusUnavailable
from cim.offline.queue import DEFAULT_QUEUE, check_item, encode, queue_declaration
from cim.offline.store import OfflineItem, OfflinePage, OfflineStore, SenderCount
from cim.reactor import ICimReactor
from cim.storage.database import Database
from cim.storage.offline import OfflineFull
from cim.storage.schema import offline_msgs

if TYPE_CHECKING:
    from cim.offline.writer import OfflineWriter, OnStored

__all__ = ["OfflinePipeline", "make_offline_pipeline"]

_CHUNK = 500


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
        link: BrokerLink | None = None,
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
            link.declare(queue_declaration(queue, max_queued)).addErrback(lambda _: None)

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
            pairs = [check_item(item) for item in items]
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
        self,
        receiver: str,
        before: int | None = None,
        limit: int = 100,
        max_bytes: int | None = None,
    ) -> Deferred[OfflinePage]:
        return self._store.page(receiver, before, limit, max_bytes)

    def acknowledge(self, receiver: str, msg_ids: Iterable[int]) -> Deferred[int]:
        return self._store.acknowledge(receiver, msg_ids)

    def summary(self, receiver: str) -> Deferred[list[SenderCount]]:
        return self._store.summary(receiver)


def make_offline_pipeline(
    config: CimConfig,
    db: Database,
    reactor: ICimReactor,
    *,
    link: BrokerLink | None = None,
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
    # Only now: pika's Twisted adapter installs the default reactor when imported.
    from cim.backends.bus.amqp_link import AmqpLink
    from cim.offline.writer import OfflineWriter

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
