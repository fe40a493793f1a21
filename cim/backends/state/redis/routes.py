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


@implementer(IRouteStore)
class RedisRouteStore:
    """Routes that expire unless their node refreshes them, so a dead node's users go."""

    def __init__(self, core: RedisCore) -> None:
        self._core = core

    def mark_online(self, record: SessionRecord) -> Deferred[None]:
        d = self._core.eval(
            scripts.MARK_ONLINE,
            record.user,
            record.session_id,
            record.node_id,
            self._core.route_ms,
            record.device,
        )
        return d.addCallback(lambda _: None)

    def mark_offline(self, record: SessionRecord) -> Deferred[None]:
        d = self._core.eval(
            scripts.MARK_OFFLINE, record.user, record.session_id, record.node_id, record.device
        )
        return d.addCallback(lambda _: None)

    def route(self, user: str) -> Deferred[str | None]:
        return self._core.command("HGET", self._core.prefix + "route:" + user, "node")

    def routes(self, users: list[str]) -> Deferred[dict[str, str]]:
        if not users:
            return defer.succeed({})
        d = self._core.eval(scripts.ROUTES, *users)

        def pair(nodes: list[Any]) -> dict[str, str]:
            return {user: node for user, node in zip(users, nodes, strict=True) if node}

        return d.addCallback(pair)

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
