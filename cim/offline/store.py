"""Offline messages and the history archive: what the pipeline stores and reads back.

``OfflineStore`` keeps messages for receivers who are offline until they pull and
acknowledge them (design: 离线消息); ``HistoryStore`` archives every message for the
history API and for the retention period (design: 用户的行为数据收集). Both take
``cim_pb2.Message`` objects and keep them serialized, so what is delivered later is
exactly what was sent, and both turn the rows of ``cim.storage.offline`` back into
messages with ``message_of``.

Checks that need no database (ids in range, names, limits, who may read a
conversation) happen here, before any work is handed to the pool; every refusal
comes as a failed Deferred.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime

from cim.message_ids import MessageIdGenerator
from cim.protocols import cim_pb2
from cim.storage.database import Database
from cim.storage.offline import (
    HistoryPage,
    HistoryRecord,
    OfflineFull,
    OfflinePage,
    OfflineRecord,
    SenderCount,
    archive_txn,
    count_offline_txn,
    delete_offline_txn,
    history_page_txn,
    offline_page_txn,
    offline_summary_txn,
    purge_history_txn,
    store_offline_txn,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "Conversation",
    "HistoryForbidden",
    "HistoryPage",
    "HistoryRecord",
    "HistoryStore",
    "OfflineFull",
    "OfflinePage",
    "OfflineRecord",
    "OfflineStore",
    "SenderCount",
    "conversation_of",
    "direct_conversation",
    "group_conversation",
    "message_of",
    "parse_conversation",
]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
"""The most a page may ask for: one answer frame must stay a reasonable size."""

DEFAULT_PURGE_BATCH = 1000
_MAX_MSG_ID = (1 << 63) - 1  # the column is a signed BIGINT

_DIRECT = "u:"
_GROUP = "g:"
_ESCAPED = re.compile("%(25|3A)")

IsGroupMember: TypeAlias = Callable[[str, str], "Deferred[bool] | bool"]
"""``(group_id, user)``: whether user is in the group, e.g. ``GroupDirectory.is_member``."""

OfflineItem: TypeAlias = "cim_pb2.Message | tuple[str, cim_pb2.Message]"
"""A message for its ``to``, or ``(receiver, message)`` for a group member's copy."""


class HistoryForbidden(Exception):
    """The reader takes no part in the conversation (or it is no conversation at all)."""

    code: ClassVar[str] = "forbidden"

    def __init__(self, reader: str, conversation: str) -> None:
        super().__init__(f"{reader} may not read conversation {conversation!r}")
        self.reader = reader
        self.conversation = conversation


# --- conversations --------------------------------------------------------------------


def _escape(name: str) -> str:
    # '%' first, or the '%' of "%3A" would be escaped again.
    return name.replace("%", "%25").replace(":", "%3A")


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda match: "%" if match.group(1) == "25" else ":", text)


def direct_conversation(a: str, b: str) -> str:
    """The key of a 1:1 conversation: the same whoever sent, never another pair's.

    The names are sorted so both directions share one key, and escaped so that a ':'
    inside a name cannot make "a:b" + "c" collide with "a" + "b:c".
    """
    first, second = sorted((a, b))
    return f"{_DIRECT}{_escape(first)}:{_escape(second)}"


def group_conversation(group_id: str) -> str:
    return f"{_GROUP}{group_id}"


@dataclass(frozen=True)
class Conversation:
    """A parsed key: either the two users of a 1:1 conversation or a group id."""

    users: tuple[str, str] | None = None
    group_id: str | None = None


def parse_conversation(key: str) -> Conversation:
    """Raises ValueError for a key that neither ``*_conversation`` function makes."""
    if key.startswith(_GROUP) and len(key) > len(_GROUP):
        return Conversation(group_id=key[len(_GROUP) :])
    if key.startswith(_DIRECT):
        parts = key[len(_DIRECT) :].split(":")
        if len(parts) == 2 and all(parts):
            first, second = (_unescape(part) for part in parts)
            if direct_conversation(first, second) == key:
                return Conversation(users=(first, second))
    raise ValueError(f"not a conversation key: {key!r}")


def conversation_of(message: cim_pb2.Message) -> str:
    if message.group:
        return group_conversation(message.group)
    return direct_conversation(getattr(message, "from"), message.to)


def message_of(record: OfflineRecord | HistoryRecord) -> cim_pb2.Message:
    return cim_pb2.Message.FromString(record.payload)


# --- checks ---------------------------------------------------------------------------


def _check_msg_id(message: cim_pb2.Message) -> int:
    if not 0 < message.id <= _MAX_MSG_ID:
        raise ValueError(f"message id {message.id} is not a server message id")
    return int(message.id)


def _sent_at(message: cim_pb2.Message) -> float:
    """The node's time; a message without one is dated by its time-ordered id."""
    millis = message.sent_at_ms or MessageIdGenerator.timestamp_ms(message.id)
    return millis / 1000.0


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"a page holds 1 to {MAX_PAGE_SIZE} messages")


def _offline_record(item: OfflineItem) -> OfflineRecord:
    if isinstance(item, tuple):
        receiver, message = item
    else:
        receiver, message = item.to, item
    sender = getattr(message, "from")
    if not receiver or not sender:
        raise ValueError(f"message {message.id} has no receiver or no sender")
    return OfflineRecord(
        receiver=receiver,
        msg_id=_check_msg_id(message),
        send_time=_sent_at(message),
        sender=sender,
        msg_type=int(message.type),
        # Only for people reading the table (the payload is what gets delivered), and
        # PostgreSQL text cannot hold NUL, which a protobuf string may.
        content=message.text.replace("\x00", "\ufffd"),
        group_id=message.group or None,
        payload=message.SerializeToString(deterministic=True),
    )


def _history_record(message: cim_pb2.Message) -> HistoryRecord:
    sender = getattr(message, "from")
    if not sender or not (message.group or message.to):
        raise ValueError(f"message {message.id} has no sender, or neither receiver nor group")
    return HistoryRecord(
        conversation=conversation_of(message),
        msg_id=_check_msg_id(message),
        sender=sender,
        receiver=None if message.group else message.to,
        group_id=message.group or None,
        sent_at=_sent_at(message),
        msg_type=int(message.type),
        payload=message.SerializeToString(deterministic=True),
    )


# --- the stores -----------------------------------------------------------------------


class OfflineStore:
    """Messages waiting for their receivers, at most ``max_per_user`` each.

    ``max_per_user`` of None means no cap. The cap is checked in the transaction that
    stores, so it holds however many consumers write at once.
    """

    def __init__(self, db: Database, max_per_user: int | None) -> None:
        if max_per_user is not None and max_per_user < 1:
            raise ValueError("max_per_user must be at least 1")
        self._db = db
        self.max_per_user = max_per_user

    def store(self, messages: Iterable[OfflineItem], *, capped: bool = True) -> Deferred[int]:
        """Store a batch in one transaction; fires with how many rows are new.

        Storing a message again is harmless (it is not counted). Fails with
        ``OfflineFull`` when a receiver would hold more than ``max_per_user``: then
        nothing of the batch is stored, and ``OfflineFull.receivers`` says whom to
        leave out to store the rest. ``capped=False`` stores whatever the cap, for
        the few messages that must never be dropped (an SOS alarm).
        """
        try:
            records = [_offline_record(item) for item in messages]
        except ValueError as exc:
            return fail(exc)
        return self._db.run(store_offline_txn, records, self.max_per_user if capped else None)

    def count(self, receiver: str) -> Deferred[int]:
        return self._db.run(count_offline_txn, receiver)

    def page(
        self, receiver: str, before: int | None = None, limit: int = DEFAULT_PAGE_SIZE
    ) -> Deferred[OfflinePage]:
        """The newest ``limit`` messages below ``before``; nothing is deleted.

        Deleting is ``acknowledge``'s job: a client that crashes before acknowledging
        gets the same messages again on its next pull.
        """
        try:
            _check_limit(limit)
        except ValueError as exc:
            return fail(exc)
        return self._db.run(offline_page_txn, receiver, before, limit)

    def acknowledge(self, receiver: str, msg_ids: Iterable[int]) -> Deferred[int]:
        """Delete receiver's acknowledged messages; fires with how many went."""
        return self._db.run(delete_offline_txn, receiver, list(msg_ids))

    def summary(self, receiver: str) -> Deferred[list[SenderCount]]:
        return self._db.run(offline_summary_txn, receiver)


class HistoryStore:
    """Every message, kept ``retention_days`` (None: for ever) and read by participants."""

    def __init__(
        self,
        db: Database,
        retention_days: float | None,
        clock: IReactorTime,
        purge_batch: int = DEFAULT_PURGE_BATCH,
    ) -> None:
        if retention_days is not None and retention_days <= 0:
            raise ValueError("retention_days must be positive (or None to keep everything)")
        if purge_batch < 1:
            raise ValueError("purge_batch must be at least 1")
        self._db = db
        self.retention_days = retention_days
        self._clock = clock
        self._purge_batch = purge_batch

    def archive(self, messages: Iterable[cim_pb2.Message]) -> Deferred[int]:
        """Archive a batch in one transaction; fires with how many rows are new."""
        try:
            records = [_history_record(message) for message in messages]
        except ValueError as exc:
            return fail(exc)
        return self._db.run(archive_txn, records)

    def page(
        self,
        reader: str,
        conversation: str,
        before: int | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        is_group_member: IsGroupMember | None = None,
    ) -> Deferred[HistoryPage]:
        """A page of the conversation, newest first, for one of its participants.

        A 1:1 conversation is readable by its two users. A group's is readable by
        whoever ``is_group_member`` says is a member now; without it, by nobody.
        Anyone else gets ``HistoryForbidden``.
        """
        try:
            _check_limit(limit)
        except ValueError as exc:
            return fail(exc)
        d = self.participates(reader, conversation, is_group_member)

        def read(allowed: bool) -> Deferred[HistoryPage]:
            if not allowed:
                raise HistoryForbidden(reader, conversation)
            return self._db.run(history_page_txn, conversation, before, limit)

        return d.addCallback(read)

    @staticmethod
    def participates(
        user: str, conversation: str, is_group_member: IsGroupMember | None = None
    ) -> Deferred[bool]:
        """False for a malformed key: it names no conversation anyone takes part in."""
        try:
            parsed = parse_conversation(conversation)
        except ValueError:
            return succeed(False)
        if parsed.users is not None:
            return succeed(user in parsed.users)
        if parsed.group_id is None or is_group_member is None:
            return succeed(False)
        return maybeDeferred(is_group_member, parsed.group_id, user).addCallback(bool)

    def purge_expired(self) -> Deferred[int]:
        """Delete what is older than the retention period; fires with how many went.

        For a periodic job (a ``LoopingCall`` the caller owns, which waits for this
        Deferred before calling again). Works in batches of ``purge_batch`` rows, one
        transaction each, so a large backlog never holds the database for long.
        """
        if self.retention_days is None:
            return succeed(0)
        cutoff = self._clock.seconds() - self.retention_days * 86400.0
        return Deferred.fromCoroutine(self._purge(cutoff))

    async def _purge(self, cutoff: float) -> int:
        total = 0
        while True:
            deleted = await self._db.run(purge_history_txn, cutoff, self._purge_batch)
            total += deleted
            if deleted < self._purge_batch:
                return total
