"""The history archive's store: every message, kept for the history API and for the
retention period (design: 用户的行为数据收集), and who may read which conversation.

Messages are kept serialized, as in the offline store (``cim.offline.store``), whose
checks (ids in range, page limits) and ``message_of`` apply here too. Checks that need
no database happen here, before any work is handed to the pool; every refusal comes
as a failed Deferred.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime

from cim.offline.store import DEFAULT_PAGE_SIZE, check_msg_id, check_page_limit, sent_at
from cim.protocols import cim_pb2
from cim.storage.database import Database
from cim.storage.offline import (
    HistoryPage,
    HistoryRecord,
    archive_txn,
    history_page_txn,
    purge_history_txn,
)

__all__ = [
    "DEFAULT_PURGE_BATCH",
    "Conversation",
    "HistoryForbidden",
    "HistoryPage",
    "HistoryRecord",
    "HistoryStore",
    "IsGroupMember",
    "conversation_of",
    "direct_conversation",
    "group_conversation",
    "parse_conversation",
]

DEFAULT_PURGE_BATCH = 1000

_DIRECT = "u:"
_GROUP = "g:"
_ESCAPED = re.compile("%(25|3A)")

IsGroupMember: TypeAlias = Callable[[str, str], "Deferred[bool] | bool"]
"""``(group_id, user)``: whether user is in the group, e.g. ``GroupDirectory.is_member``."""


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


def _history_record(message: cim_pb2.Message) -> HistoryRecord:
    sender = getattr(message, "from")
    if not sender or not (message.group or message.to):
        raise ValueError(f"message {message.id} has no sender, or neither receiver nor group")
    return HistoryRecord(
        conversation=conversation_of(message),
        msg_id=check_msg_id(message),
        sender=sender,
        receiver=None if message.group else message.to,
        group_id=message.group or None,
        sent_at=sent_at(message),
        msg_type=int(message.type),
        payload=message.SerializeToString(deterministic=True),
    )


# --- the store -----------------------------------------------------------------------


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
        max_bytes: int | None = None,
    ) -> Deferred[HistoryPage]:
        """A page of the conversation, newest first, for one of its participants, at
        most ``max_bytes`` of messages (but at least one).

        A 1:1 conversation is readable by its two users. A group's is readable by
        whoever ``is_group_member`` says is a member now; without it, by nobody.
        Anyone else gets ``HistoryForbidden``.
        """
        try:
            check_page_limit(limit)
        except ValueError as exc:
            return fail(exc)
        d = self.participates(reader, conversation, is_group_member)

        def read(allowed: bool) -> Deferred[HistoryPage]:
            if not allowed:
                raise HistoryForbidden(reader, conversation)
            return self._db.run(history_page_txn, conversation, before, limit, max_bytes)

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
