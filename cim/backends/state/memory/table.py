"""The data the memory backend's sessions and routes facets share: one table of logins.

A user has one session per device (up to ``[im] max_devices_per_user``, decided by
``create_session``); the user is online while any of its devices is.

A session and its online entry live and die together (a kick takes the route with it,
a refuse_new login asks whether the old session is online), so both facets work on
this one table instead of on each other. Every entry is reachable from a live session
and is removed when that session ends, so memory follows the number of live sessions,
never the number of logins made.

A user's sessions by device (the current ones, the connected ones) are kept as the
record itself while the user has one device, which is nearly every user, and as a dict
from the second: a dict per user, twice per logged-in user, cost 368 bytes of the
3.1 KiB an idle connection cost (issue #20's target is 3 KiB).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeAlias

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cim.backends.state import REASON_EXPIRED
from cim.interfaces import SessionEndedListener, SessionRecord

ByDevice: TypeAlias = "SessionRecord | dict[str, SessionRecord]"
"""One user's sessions by device: the record while there is one, else device -> record."""


def _of(entry: ByDevice | None, device: str) -> SessionRecord | None:
    if entry is None:
        return None
    if isinstance(entry, SessionRecord):
        return entry if entry.device == device else None
    return entry.get(device)


def _records(entry: ByDevice | None) -> list[SessionRecord]:
    if entry is None:
        return []
    if isinstance(entry, SessionRecord):
        return [entry]
    return list(entry.values())


def _put(entry: ByDevice | None, record: SessionRecord) -> ByDevice:
    """``entry`` with ``record`` as its device's (a dict from the second device on)."""
    if entry is None:
        return record
    if isinstance(entry, SessionRecord):
        if entry.device == record.device:
            return record
        return {entry.device: entry, record.device: record}
    entry[record.device] = record
    return entry


def _remove(by_user: dict[str, ByDevice], user: str, device: str) -> None:
    """The user's entry without ``device``: back to the bare record at one device, gone
    at none."""
    entry = by_user[user]
    if isinstance(entry, SessionRecord):
        left: ByDevice | None = None if entry.device == device else entry
    else:
        entry.pop(device, None)
        left = next(iter(entry.values())) if len(entry) == 1 else (entry or None)
    if left is None:
        del by_user[user]
    else:
        by_user[user] = left


class SessionTable:
    """Sessions keyed by token hash, one current session per (user, device), and which
    devices are online.

    Expiry is enforced on every lookup (``live``), so correctness never waits for the
    prune; ``end_expired`` only gives back the memory of sessions nobody looks up again.
    The facets read the dicts directly; changes that touch more than one of them go
    through the methods, which keep them consistent.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.sessions: dict[str, SessionRecord] = {}
        self.devices_by_user: dict[str, ByDevice] = {}
        """user -> the current session of each of its devices."""
        self.online: dict[str, ByDevice] = {}
        """user -> the session connected on each device (every online user has one or
        more)."""
        self.online_per_node: dict[str, dict[str, int]] = {}
        """node -> user -> how many of the user's devices are connected there."""
        # One queue per TTL, each in creation order. With a monotonic clock that is
        # also expiry order, so the prune pops expired sessions off the front and
        # never walks the live ones.
        self.expiry_queues: dict[float, OrderedDict[str, float]] = {}
        self._listeners: list[SessionEndedListener] = []

    def add_listener(self, listener: SessionEndedListener) -> None:
        self._listeners.append(listener)

    # --- sessions ---------------------------------------------------------------------

    def add(self, record: SessionRecord) -> None:
        """Store a new session as its device's current one."""
        token_hash = record.token_hash
        self.sessions[token_hash] = record
        by_user = self.devices_by_user
        by_user[record.user] = _put(by_user.get(record.user), record)
        queue = self.expiry_queues.setdefault(_lifetime(record), OrderedDict())
        queue[token_hash] = record.expires_at

    def live(self, token_hash: str) -> SessionRecord | None:
        """The session if it has not expired; an expired one is ended on the way."""
        record = self.sessions.get(token_hash)
        if record is None:
            return None
        if record.expires_at <= self.clock.seconds():
            self.end(token_hash, REASON_EXPIRED)
            return None
        return record

    def end(self, token_hash: str, reason: str) -> SessionRecord | None:
        """Remove the session and tell the listeners why."""
        record = self.forget(token_hash)
        if record is not None:
            self.tell(record, reason)
        return record

    def forget(self, token_hash: str) -> SessionRecord | None:
        """Remove every trace of a session, without telling anyone."""
        record = self.sessions.pop(token_hash, None)
        if record is None:
            return None
        by_user = self.devices_by_user
        current = _of(by_user.get(record.user), record.device)
        if current is not None and current.token_hash == token_hash:
            _remove(by_user, record.user, record.device)
        if self.is_online(record):
            self.set_offline(record)
        lifetime = _lifetime(record)
        queue = self.expiry_queues.get(lifetime)
        if queue is not None:
            queue.pop(token_hash, None)
            if not queue:
                del self.expiry_queues[lifetime]
        return record

    def end_expired(self) -> int:
        """End every session past its expiry; returns how many ended."""
        now = self.clock.seconds()
        ended = 0
        for ttl in list(self.expiry_queues):
            queue = self.expiry_queues.get(ttl)
            while queue:
                token_hash, expires_at = next(iter(queue.items()))
                if expires_at > now:
                    break
                self.end(token_hash, REASON_EXPIRED)
                ended += 1
        return ended

    def tell(self, record: SessionRecord, reason: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(record, reason)
            except Exception:
                # One faulty listener must not stop the others or corrupt the store.
                self._log.failure(
                    "session-ended listener failed for user {user!r}", user=record.user
                )

    # --- online entries ---------------------------------------------------------------

    def current(self, user: str, device: str) -> SessionRecord | None:
        """The device's current session (expired or not), or None."""
        return _of(self.devices_by_user.get(user), device)

    def device_sessions(self, user: str) -> list[SessionRecord]:
        """The current session of each of the user's devices (expired or not)."""
        return _records(self.devices_by_user.get(user))

    def online_session(self, user: str, device: str) -> SessionRecord | None:
        """The session connected on the device, or None."""
        return _of(self.online.get(user), device)

    def online_sessions(self, user: str) -> list[SessionRecord]:
        return _records(self.online.get(user))

    def newest_online(self, user: str) -> SessionRecord | None:
        """The user's newest connected session: where the router sends it now."""
        entry = self.online.get(user)
        if entry is None or isinstance(entry, SessionRecord):
            return entry
        return max(entry.values(), key=lambda record: record.created_at)

    def is_online(self, record: SessionRecord) -> bool:
        online = _of(self.online.get(record.user), record.device)
        return online is not None and online.session_id == record.session_id

    def set_online(self, record: SessionRecord) -> None:
        previous = _of(self.online.get(record.user), record.device)
        if previous is not None:
            self.set_offline(previous)
        self.online[record.user] = _put(self.online.get(record.user), record)
        users = self.online_per_node.setdefault(record.node_id, {})
        users[record.user] = users.get(record.user, 0) + 1

    def set_offline(self, record: SessionRecord) -> None:
        """The device's connection is gone (whichever session it held)."""
        online = _of(self.online.get(record.user), record.device)
        if online is None:
            return
        _remove(self.online, record.user, record.device)
        users = self.online_per_node[online.node_id]
        users[online.user] -= 1
        if not users[online.user]:
            del users[online.user]
            if not users:
                del self.online_per_node[online.node_id]


def _lifetime(record: SessionRecord) -> float:
    """The queue key, computed the same way on insert and removal so floats match."""
    return record.expires_at - record.created_at
