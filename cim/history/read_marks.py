"""Users' read marks as the node asks for them (cim.storage.read_marks does the work).

A read mark is one short transaction, straight to the database (not batched like
cursor moves): the answer (READ_A) and the notices to the user's other devices and to
a 1:1 peer say what is durable, so they wait for the commit. A database that fails
is ``TimelineUnavailable`` to the room (UNAVAILABLE, the client asks again); a
refusal (``ReadRefused``) passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from cim.history.timeline import TimelineUnavailable
from cim.storage.database import Database
from cim.storage.read_marks import Readers, ReadMark, ReadRefused, mark_read_txn, readers_txn
from cim.storage.schema import CONVERSATION_MAX

__all__ = ["ReadMarks"]


def _unreadable(conversation: str) -> str | None:
    """Why a conversation key could never name a timeline (checked before the
    database sees it: PostgreSQL refuses a NUL in text, which is not "try again")."""
    if not conversation.startswith(("d:", "g:")):
        return "conversation must be a timeline key (d:... or g:...)"
    if len(conversation) > CONVERSATION_MAX or "\x00" in conversation:
        return "no such conversation"
    return None


def _unavailable(failure: Failure) -> Failure:
    if failure.check(ReadRefused, TimelineUnavailable):
        return failure
    return Failure(TimelineUnavailable(f"read marks: {failure.getErrorMessage()}"))


class ReadMarks:
    """``ReadMarkStore`` on the node's database."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        settled: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        """``settled``: the timelines' (``Timelines.settled``): a mark checks its seq
        against the conversation, which must hold every message promised before."""
        self._db = db
        self._clock = clock
        self._settled = settled

    def _run(self, txn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._settled is None:
            return self._db.run(txn, *args)
        return self._settled().addCallback(lambda _: self._db.run(txn, *args))

    def mark(self, user: str, conversation: str, seq: int) -> Deferred[ReadMark]:
        problem = _unreadable(conversation)
        if problem is not None:
            return fail(ReadRefused("bad_request", problem))
        d: Deferred[Any] = self._run(mark_read_txn, user, conversation, seq, self._clock.seconds())
        return d.addErrback(_unavailable)

    def readers(self, asker: str, conversation: str, seq: int) -> Deferred[Readers]:
        problem = _unreadable(conversation)
        if problem is not None:
            return fail(ReadRefused("bad_request", problem))
        d: Deferred[Any] = self._run(readers_txn, asker, conversation, seq)
        return d.addErrback(_unavailable)
