"""The Redis backend's sessions facet: logins decided atomically by one script each."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.backends.state import (
    KICK_OLD,
    REASON_EXPIRED,
    REASON_LOGGED_IN_AGAIN,
    REASON_LOGGED_IN_ELSEWHERE,
    REFUSE_NEW,
)
from cim.backends.state.redis import scripts
from cim.backends.state.redis.core import SESSION_GRACE, RedisCore, record_from_reply
from cim.interfaces import AlreadyLoggedIn, ISessionStore, SessionEndedListener, SessionRecord


@implementer(ISessionStore)
class RedisSessionStore:
    """Sessions (one per device of a user) shared by every node; their endings reach
    every node's listeners."""

    def __init__(self, core: RedisCore) -> None:
        self._core = core

    def create_session(
        self,
        token_hash: str,
        user: str,
        device: str,
        node_id: str,
        ttl: float,
        policy: str,
        max_devices: int = 1,
    ) -> Deferred[tuple[SessionRecord, SessionRecord | None]]:
        if policy not in (KICK_OLD, REFUSE_NEW):
            return defer.fail(ValueError(f"unknown duplicate-login policy {policy!r}"))
        now = self._core.clock.seconds()
        record = SessionRecord(
            session_id=uuid.uuid4().hex,
            user=user,
            device=device,
            node_id=node_id,
            created_at=now,
            expires_at=now + ttl,
            token_hash=token_hash,
        )
        pttl = str(int((ttl + SESSION_GRACE) * 1000))
        d = self._core.eval(
            scripts.CREATE_SESSION,
            token_hash,
            user,
            device,
            node_id,
            repr(record.created_at),
            repr(record.expires_at),
            policy,
            record.session_id,
            pttl,
            self._core.tombstone_ms,
            str(max_devices),
        )

        def decided(reply: list[Any]) -> tuple[SessionRecord, SessionRecord | None]:
            self._core.route_changed(user)
            if reply[0] == "taken":
                # Only a broken token generator gets here; never let one login take over another.
                raise ValueError("token hash already in use")
            if reply[0] == "refused":
                raise AlreadyLoggedIn(user)
            previous = record_from_reply(reply[1]) if reply[1] else None
            for expired in reply[2] or ():
                self._core.tell(record_from_reply(expired), REASON_EXPIRED)
            if previous is not None:
                self._core.tell(previous, REASON_LOGGED_IN_AGAIN)
            for dropped in reply[3] or ():
                self._core.tell(record_from_reply(dropped), REASON_LOGGED_IN_ELSEWHERE)
            return record, previous

        return d.addCallback(decided)

    def session_for_token(self, token_hash: str) -> Deferred[SessionRecord | None]:
        core = self._core
        d = core.eval(scripts.SESSION_FOR_TOKEN, token_hash, core.now(), core.tombstone_ms)
        return d.addCallback(self._live_or_told)

    def redeem_ticket(
        self, ticket_id: str, token_hash: str, expires_at: float
    ) -> Deferred[SessionRecord | None]:
        core = self._core
        d = core.eval(
            scripts.REDEEM_TICKET,
            token_hash,
            core.now(),
            core.tombstone_ms,
            ticket_id,
            str(int(expires_at * 1000)),
        )
        return d.addCallback(self._live_or_told)

    def end_session(self, token_hash: str, reason: str) -> Deferred[SessionRecord | None]:
        core = self._core
        d = core.eval(scripts.END_SESSION, token_hash, core.now(), reason, core.tombstone_ms)
        return d.addCallback(self._ended, reason)

    def end_user_sessions(
        self, user: str, reason: str, device: str = "", keep_device: str = ""
    ) -> Deferred[list[SessionRecord]]:
        core = self._core
        d = core.eval(
            scripts.END_USER_SESSION,
            user,
            core.now(),
            reason,
            core.tombstone_ms,
            device,
            keep_device,
        )

        def ended(replies: list[Any] | None) -> list[SessionRecord]:
            records = [self._ended(reply, reason) for reply in replies or ()]
            return sorted((r for r in records if r is not None), key=lambda r: r.device)

        return d.addCallback(ended)

    def add_session_ended_listener(self, listener: SessionEndedListener) -> None:
        self._core.add_listener(listener)

    def _ended(self, reply: list[Any] | None, reason: str) -> SessionRecord | None:
        if reply is None:
            return None
        record = record_from_reply(reply[1])
        if reply[0] == "expired":
            self._core.tell(record, REASON_EXPIRED)
            return None
        self._core.tell(record, reason)
        return record

    def _live_or_told(self, reply: list[Any] | None) -> SessionRecord | None:
        if reply is None:
            return None
        record = record_from_reply(reply[1])
        if reply[0] == "expired":
            self._core.tell(record, REASON_EXPIRED)
            return None
        return record
