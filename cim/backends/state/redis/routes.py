"""The Redis backend's routes facet: where each online user is connected, for every node."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.backends.state.redis import scripts
from cim.backends.state.redis.core import RedisCore
from cim.interfaces import IRouteStore, SessionRecord

REFRESH_BATCH = 500
"""Records per refresh script: bounds how long one script holds Redis."""
CACHED_ROUTES = 100_000
"""Users whose node this node remembers at most (then it forgets them all, and asks)."""
CACHE_AGE = 1.0
"""Seconds a cached node is used: no notification says a route expired (its node
died and stopped refreshing it), so a cached one is read again this often."""


@implementer(IRouteStore)
class RedisRouteStore:
    """Routes that expire unless their node refreshes them, so a dead node's users go.

    ``route`` answers from a cache of the users' nodes, which every change of a
    user's node empties for that user: the scripts publish the
    user on ``route-changed`` whenever its route's node changes or the route goes, and
    every node forgets it (and the node that made the change, at its reply: a node
    reads its own writes, the command connection answering in order). An answer read
    while a change was published is not kept
    (the two connections may deliver them in either order), and the whole cache goes
    when the notifications were down. No notification says a route expired with its
    node, so an answer is kept ``CACHE_AGE`` at most; meanwhile the node's death is
    the registry's to tell (``Peers.is_alive``). A message sent on a cached route to
    a user who moved anyway is caught by the node it reaches (the user is not
    connected there: "stored", and a pull notice to wherever it is now).

    "Not online" is never cached: a message stored for a user who is connecting
    must reach its node as a pull notice (the user's catch-up may have read its
    timeline already), and a late notification on a busy node would lose that.
    Lookups of one user while a read of its route is on its way share that read:
    eight senders writing to one offline user made one HGET per message, the largest
    part of storing a message on Redis (docs/benchmarks.md).
    """

    def __init__(self, core: RedisCore) -> None:
        self._core = core
        self._cached: dict[str, tuple[str, float]] = {}
        """user -> (its node, when that was read)"""
        self._changes = 0
        """Changes heard so far: an answer read across one is not cached."""
        self._asking: dict[str, list[Deferred[str | None]]] = {}
        """Users whose route is being read, and who else waits for that answer."""
        core.add_route_listener(self._changed)

    def _changed(self, user: str | None) -> None:
        self._changes += 1
        if user is None:
            self._cached.clear()
        else:
            self._cached.pop(user, None)

    def mark_online(self, record: SessionRecord) -> Deferred[None]:
        d = self._core.eval(
            scripts.MARK_ONLINE,
            record.user,
            record.session_id,
            record.node_id,
            self._core.route_ms,
            record.device,
        )
        return d.addCallback(lambda _: self._core.route_changed(record.user))

    def mark_offline(self, record: SessionRecord) -> Deferred[None]:
        d = self._core.eval(
            scripts.MARK_OFFLINE, record.user, record.session_id, record.node_id, record.device
        )
        return d.addCallback(lambda _: self._core.route_changed(record.user))

    def route(self, user: str) -> Deferred[str | None]:
        now = self._core.reactor.seconds()
        cached = self._cached.get(user)
        if cached is not None and now - cached[1] < CACHE_AGE:
            return defer.succeed(cached[0])
        waiting = self._asking.get(user)
        if waiting is not None:
            # A read for this user is on its way: share its answer (no older than one
            # round trip, which a "not online" answer may be anyway: the message is
            # stored, and the look after the store finds a user who came meanwhile).
            shared: Deferred[str | None] = Deferred()
            waiting.append(shared)
            return shared
        self._asking[user] = []
        changes = self._changes
        d = self._core.command("HGET", self._core.prefix + "route:" + user, "node")

        def keep(node: str | None) -> str | None:
            self._keep(changes, now, {user: node})
            return node

        def share(result: str | Failure | None) -> str | Failure | None:
            for waiter in self._asking.pop(user, ()):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        return d.addCallback(keep).addBoth(share)

    def routes(self, users: list[str]) -> Deferred[dict[str, str]]:
        now = self._core.reactor.seconds()
        known: dict[str, str] = {}
        asked: list[str] = []
        for user in users:
            cached = self._cached.get(user)
            if cached is not None and now - cached[1] < CACHE_AGE:
                known[user] = cached[0]
            else:
                asked.append(user)
        if not asked:
            return defer.succeed(known)
        changes = self._changes
        d = self._core.eval(scripts.ROUTES, *asked)

        def pair(nodes: list[Any]) -> dict[str, str]:
            read = dict(zip(asked, (node or None for node in nodes), strict=True))
            self._keep(changes, now, read)
            known.update((user, node) for user, node in read.items() if node)
            return known

        return d.addCallback(pair)

    def _keep(self, changes: int, now: float, read: dict[str, str | None]) -> None:
        """Cache what was read, unless a change was heard meanwhile or could have been
        missed (the notifications are down)."""
        if changes != self._changes or not self._core.connection.notified:
            return
        if len(self._cached) + len(read) > CACHED_ROUTES:
            self._cached.clear()
        for user, node in read.items():
            if node is not None:
                self._cached[user] = (node, now)

    def online_devices(self, users: list[str]) -> Deferred[dict[str, list[str]]]:
        if not users:
            return defer.succeed({})
        d = self._core.eval(scripts.ONLINE_DEVICES, *users)

        def pair(lists: list[Any]) -> dict[str, list[str]]:
            return {
                user: sorted(devices) for user, devices in zip(users, lists, strict=True) if devices
            }

        return d.addCallback(pair)

    def online_users(self, offset: int, limit: int) -> Deferred[tuple[int, list[str]]]:
        if offset < 0 or limit < 0:
            return defer.fail(ValueError("offset and limit must not be negative"))
        d = self._core.eval(scripts.ONLINE_USERS, str(offset), str(limit))
        return d.addCallback(lambda reply: (int(reply[0]), list(reply[1])))

    def online_count_by_node(self) -> Deferred[dict[str, int]]:
        d = self._core.eval(scripts.ONLINE_COUNT_BY_NODE)
        return d.addCallback(
            lambda flat: {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        )

    def refresh_sessions(self, node_id: str, records: list[SessionRecord]) -> Deferred[None]:
        """Extend routes and rewrite what Redis lost, in batches of one script each.

        A record whose session turns out to be over (logged out, replaced, expired
        while this node missed the notification) is not brought back: its listeners
        are told instead, so the node drops the connection.
        """
        mine = [r for r in records if r.node_id == node_id and r.token_hash]
        if not mine:
            return defer.succeed(None)
        core = self._core
        now = core.now()
        batches = []
        for start in range(0, len(mine), REFRESH_BATCH):
            batch = mine[start : start + REFRESH_BATCH]
            args: list[str] = [node_id, core.route_ms, now, core.grace_ms, core.tombstone_ms]
            for r in batch:
                args += [
                    r.token_hash,
                    r.session_id,
                    r.user,
                    r.device,
                    repr(r.created_at),
                    repr(r.expires_at),
                ]
            by_hash = {r.token_hash: r for r in batch}
            d = core.eval(scripts.REFRESH_SESSIONS, *args)
            d.addCallback(self._tell_ended, by_hash)
            batches.append(d)
        done = defer.gatherResults(batches, consumeErrors=True)
        return done.addCallbacks(lambda _: None, _first_failure)

    def _tell_ended(self, reply: list[Any], by_hash: dict[str, SessionRecord]) -> None:
        for token_hash, reason in reply:
            record = by_hash.get(token_hash)
            if record is not None:
                self._core.tell(record, reason)


def _first_failure(failure: Failure) -> Failure:
    """gatherResults wraps the first failure; callers want the StateUnavailable itself."""
    if isinstance(failure.value, defer.FirstError):
        sub: Failure = failure.value.subFailure
        return sub
    return failure
