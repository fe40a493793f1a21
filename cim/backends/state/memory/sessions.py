"""The memory backend's sessions facet: logins, per-device limits, logouts."""

from __future__ import annotations

import heapq
import uuid
from dataclasses import dataclass, field

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
from cim.backends.state.memory.table import SessionTable
from cim.interfaces import AlreadyLoggedIn, ISessionStore, SessionEndedListener, SessionRecord


@dataclass
class _UsedTickets:
    """Resumption ticket ids redeemed so far, each kept until its ticket expires (then
    the expiry alone refuses it): memory follows the tickets used within one window."""

    ids: set[str] = field(default_factory=set)
    expiries: list[tuple[float, str]] = field(default_factory=list)


@implementer(ISessionStore)
class MemorySessionStore:
    """One current session per device of a user, decided and ended on the shared table."""

    def __init__(self, table: SessionTable) -> None:
        self._table = table
        self._used_tickets = _UsedTickets()

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
        table = self._table
        if policy not in (KICK_OLD, REFUSE_NEW):
            return defer.fail(ValueError(f"unknown duplicate-login policy {policy!r}"))
        if token_hash in table.sessions:
            # Only a broken token generator gets here; never let one login take over another.
            return defer.fail(ValueError("token hash already in use"))
        now = table.clock.seconds()
        same: str | None = None
        online = 0
        offline: list[SessionRecord] = []
        for old in table.device_sessions(user):
            if old.expires_at <= now:
                table.end(old.token_hash, REASON_EXPIRED)
            elif old.device == device:
                same = old.token_hash
            elif table.is_online(old):
                online += 1
            else:
                offline.append(old)
        if same is None and policy == REFUSE_NEW and online >= max_devices:
            return defer.fail(AlreadyLoggedIn(user))
        previous = table.forget(same) if same is not None else None
        # At most max_devices sessions: devices offline give way first, oldest first.
        # Past that (kick_old, all online) the node ends the device idle longest once the
        # new one connects: only it knows which that is.
        offline.sort(key=lambda record: record.created_at)
        excess = max(0, online + len(offline) + 1 - max_devices)
        dropped = [table.forget(old.token_hash) for old in offline[:excess]]
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
        # Listeners hear of the ends only once the new session is in place, so a
        # listener that looks the user up sees the state as it now is.
        if previous is not None:
            table.tell(previous, REASON_LOGGED_IN_AGAIN)
        for old_record in dropped:
            if old_record is not None:
                table.tell(old_record, REASON_LOGGED_IN_ELSEWHERE)
        return defer.succeed((record, previous))

    def session_for_token(self, token_hash: str) -> Deferred[SessionRecord | None]:
        return defer.succeed(self._table.live(token_hash))

    def redeem_ticket(
        self, ticket_id: str, token_hash: str, expires_at: float
    ) -> Deferred[SessionRecord | None]:
        record = self._table.live(token_hash)
        if record is None:
            return defer.succeed(None)
        used = self._used_tickets
        now = self._table.clock.seconds()
        while used.expiries and used.expiries[0][0] <= now:
            used.ids.discard(heapq.heappop(used.expiries)[1])
        if expires_at <= now or ticket_id in used.ids:
            return defer.succeed(None)
        used.ids.add(ticket_id)
        heapq.heappush(used.expiries, (expires_at, ticket_id))
        return defer.succeed(record)

    def end_session(self, token_hash: str, reason: str) -> Deferred[SessionRecord | None]:
        if self._table.live(token_hash) is None:
            return defer.succeed(None)
        return defer.succeed(self._table.end(token_hash, reason))

    def end_user_sessions(
        self, user: str, reason: str, device: str = "", keep_device: str = ""
    ) -> Deferred[list[SessionRecord]]:
        table = self._table
        ended: list[SessionRecord] = []
        for current in sorted(table.device_sessions(user), key=lambda each: each.device):
            if (device and current.device != device) or current.device == keep_device:
                continue
            if table.live(current.token_hash) is None:
                continue
            record = table.end(current.token_hash, reason)
            if record is not None:
                ended.append(record)
        return defer.succeed(ended)

    def add_session_ended_listener(self, listener: SessionEndedListener) -> None:
        self._table.add_listener(listener)
