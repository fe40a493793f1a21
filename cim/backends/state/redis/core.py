"""What the four Redis facets share: one key space, one connection, the session-ended news.

Sessions and routes are one key space on purpose: a login decides on the old session's
route, a logout removes the route with the session, and a node's refresh rewrites
sessions, routes and online entries together in one script. Whichever facet ends a
session, the listeners hear of it through this core, once per session on this node,
whether it ended here or on another node (the ``session-ended`` channel).

Keys (all under the prefix, ``cim:`` by default)::

    session:{token_hash}  hash: the SessionRecord; expires a grace period after the
                          session so the expiry sweep can still tell who expired
    user:{user}           the token hash of the user's current session
    route:{user}          hash node, sid: where the user is connected; TTL route_ttl,
                          extended by the node's refresh, so a dead node's routes go
    online:{node}         zset user -> route deadline (ms, Redis clock): per-node counts
    online                zset user -> 0: every online user, in name order for paging
    nodes                 set of node ids with online users
    expiry                zset token_hash -> expires_at: what the sweep ends, and when
    ended:{token_hash}    tombstone (the reason) so a refresh racing a logout cannot
                          bring the session back
    session-ended         pub/sub channel: JSON of every session that ends
    route-changed         pub/sub channel: a user whose route's node changed (or went),
                          for the nodes' caches of routes (routes.py)
    sent:{sender triple}  hash: the receipt of one sender message, for the dedup window
    node-numbers          hash node id -> number; node-number-seq the last one given

The scripts build key names from the prefix, so they need a single Redis (or a
primary behind Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cim.backends.state.redis.address import RedisAddress
from cim.backends.state.redis.connection import RedisConnection
from cim.backends.state.redis.scripts import Script
from cim.interfaces import SessionEndedListener, SessionRecord
from cim.reactor import ICimReactor

SESSION_GRACE = 3600.0
"""Seconds a session's data outlives its expiry, so the sweep can announce it."""
ROUTE_CHANGED = "route-changed"
TOLD_MEMORY = 10_000
"""Session ids remembered as already told, to drop the echo of our own publications."""

_log = Logger(namespace="cim.state.redis")


class RedisCore:
    """The key space (prefix, TTLs in ms), the connection to it, and the listeners.

    ``clock`` supplies session times, so tests can expire sessions without waiting;
    route deadlines use Redis's own clock, so nodes with skewed clocks still agree on
    whose route is alive.
    """

    def __init__(
        self,
        reactor: ICimReactor,
        clock: IReactorTime,
        address: RedisAddress,
        reply_timeout: float,
        route_ttl: float,
        key_prefix: str,
        reconnect_delay: float,
        max_reconnect_delay: float,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.prefix = key_prefix
        self.route_ms = str(int(route_ttl * 1000))
        self.tombstone_ms = str(int(max(3 * route_ttl, 60.0) * 1000))
        self.grace_ms = str(int(SESSION_GRACE * 1000))
        self.connection = RedisConnection(
            reactor,
            address,
            reply_timeout,
            [key_prefix + "session-ended", key_prefix + ROUTE_CHANGED],
            self._notified,
            reconnect_delay,
            max_reconnect_delay,
            self._resubscribed,
        )
        self._listeners: list[SessionEndedListener] = []
        self._route_listeners: list[Callable[[str | None], None]] = []
        self._told: OrderedDict[str, None] = OrderedDict()

    def now(self) -> str:
        """The session clock's time, as the scripts take it."""
        return repr(self.clock.seconds())

    def command(self, *args: str) -> Deferred[Any]:
        return self.connection.command(*args)

    def eval(self, script: Script, *args: str) -> Deferred[Any]:
        """Run one of the scripts; the key prefix is always its first argument."""
        return self.connection.eval(script, self.prefix, *args)

    # --- session-ended notifications ---------------------------------------------------

    def add_listener(self, listener: SessionEndedListener) -> None:
        self._listeners.append(listener)

    def tell(self, record: SessionRecord, reason: str) -> None:
        """Call the listeners, once per session on this node.

        A session this store ended itself is told here at once and then comes back
        as the echo of its own publication; a refresh may find an ending this node
        was also notified of. The memory of told session ids drops the repeats.
        """
        # Whatever ended it changed the user's route: forget it now, not at the echo.
        self.route_changed(record.user)
        if record.session_id in self._told:
            return
        self._told[record.session_id] = None
        if len(self._told) > TOLD_MEMORY:
            self._told.popitem(last=False)
        for listener in list(self._listeners):
            try:
                listener(record, reason)
            except Exception:
                # One faulty listener must not stop the others or corrupt the store.
                _log.failure("session-ended listener failed for user {user!r}", user=record.user)

    # --- route-changed notifications ---------------------------------------------------

    def add_route_listener(self, listener: Callable[[str | None], None]) -> None:
        """``listener(user)`` when the user's route changed; ``listener(None)`` when
        changes may have been missed (the notifications were resubscribed)."""
        self._route_listeners.append(listener)

    def route_changed(self, user: str) -> None:
        """This node changed the user's route (its reply is in): its cache forgets it
        at once, before the notification comes back."""
        for listener in self._route_listeners:
            listener(user)

    def _resubscribed(self) -> None:
        for listener in self._route_listeners:
            listener(None)

    def _notified(self, channel: str, message: str) -> None:
        if channel == self.prefix + ROUTE_CHANGED:
            self.route_changed(message)
            return
        try:
            data = json.loads(message)
            record = SessionRecord(
                session_id=data["session_id"],
                user=data["user"],
                device=data["device"],
                node_id=data["node_id"],
                created_at=float(data["created_at"]),
                expires_at=float(data["expires_at"]),
                token_hash=data["token_hash"],
            )
            reason = str(data["reason"])
        except (ValueError, KeyError, TypeError):
            _log.warn("state store: ignoring a malformed session-ended notification")
            return
        self.tell(record, reason)


def record_from_reply(fields: list[Any]) -> SessionRecord:
    """A session as the scripts return it (prelude.lua's as_list)."""
    session_id, user, device, node_id, created_at, expires_at, token_hash = fields
    return SessionRecord(
        session_id=session_id,
        user=user,
        device=device,
        node_id=node_id,
        created_at=float(created_at),
        expires_at=float(expires_at),
        token_hash=token_hash,
    )
