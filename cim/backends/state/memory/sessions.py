"""The memory backend's sessions facet: logins, duplicate-login decisions, logouts."""

from __future__ import annotations

import uuid

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.backends.state import (
    KICK_OLD,
    REASON_EXPIRED,
    REASON_LOGGED_IN_ELSEWHERE,
    REFUSE_NEW,
)
from cim.backends.state.memory.table import SessionTable
from cim.interfaces import AlreadyLoggedIn, ISessionStore, SessionEndedListener, SessionRecord


@implementer(ISessionStore)
class MemorySessionStore:
    """One current session per user, decided and ended on the shared table."""

    def __init__(self, table: SessionTable) -> None:
        self._table = table

    def create_session(
        self,
        token_hash: str,
        user: str,
        device: str,
        node_id: str,
        ttl: float,
        policy: str,
    ) -> Deferred[tuple[SessionRecord, SessionRecord | None]]:
        table = self._table
        if policy not in (KICK_OLD, REFUSE_NEW):
            return defer.fail(ValueError(f"unknown duplicate-login policy {policy!r}"))
        if token_hash in table.sessions:
            # Only a broken token generator gets here; never let one login take over another.
            return defer.fail(ValueError("token hash already in use"))
        now = table.clock.seconds()
        previous: SessionRecord | None = None
        previous_hash = table.token_hash_by_user.get(user)
        if previous_hash is not None:
            old = table.sessions[previous_hash]
            if old.expires_at <= now:
                table.end(previous_hash, REASON_EXPIRED)
            elif policy == REFUSE_NEW and table.is_online(old):
                return defer.fail(AlreadyLoggedIn(user))
            else:
                previous = table.forget(previous_hash)

        record = SessionRecord(
            session_id=uuid.uuid4().hex,
            user=user,
            device=device,
            node_id=node_id,
            created_at=now,
            expires_at=now + ttl,
            token_hash=token_hash,
        )
        table.add(record)
        # Listeners hear of the kick only once the new session is in place, so a
        # listener that looks the user up sees the state as it now is.
        if previous is not None:
            table.tell(previous, REASON_LOGGED_IN_ELSEWHERE)
        return defer.succeed((record, previous))

    def session_for_token(self, token_hash: str) -> Deferred[SessionRecord | None]:
        return defer.succeed(self._table.live(token_hash))

    def end_session(self, token_hash: str, reason: str) -> Deferred[SessionRecord | None]:
        if self._table.live(token_hash) is None:
            return defer.succeed(None)
        return defer.succeed(self._table.end(token_hash, reason))

    def end_user_session(self, user: str, reason: str) -> Deferred[SessionRecord | None]:
        token_hash = self._table.token_hash_by_user.get(user)
        if token_hash is None or self._table.live(token_hash) is None:
            return defer.succeed(None)
        return defer.succeed(self._table.end(token_hash, reason))

    def add_session_ended_listener(self, listener: SessionEndedListener) -> None:
        self._table.add_listener(listener)
