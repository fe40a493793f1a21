"""The memory backend's routes facet: where each online user is connected."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.backends.state.memory.table import SessionTable
from cim.interfaces import IRouteStore, SessionRecord


@implementer(IRouteStore)
class MemoryRouteStore:
    """Online entries on the shared table: only a live session can be online."""

    def __init__(self, table: SessionTable) -> None:
        self._table = table

    def mark_online(self, record: SessionRecord) -> Deferred[None]:
        table = self._table
        current = table.current(record.user, record.device)
        if current is None or current.session_id != record.session_id:
            # The session ended (kicked, logged out) while its handshake was in flight.
            return defer.succeed(None)
        table.set_online(record)
        return defer.succeed(None)

    def mark_offline(self, record: SessionRecord) -> Deferred[None]:
        online = self._table.online_session(record.user, record.device)
        if (
            online is not None
            and online.session_id == record.session_id
            and online.node_id == record.node_id
        ):
            self._table.set_offline(record)
        return defer.succeed(None)

    def route(self, user: str) -> Deferred[str | None]:
        return defer.succeed(self._node_of(user))

    def routes(self, users: list[str]) -> Deferred[dict[str, str]]:
        nodes = {user: self._node_of(user) for user in users}
        return defer.succeed({user: node for user, node in nodes.items() if node is not None})

    def _node_of(self, user: str) -> str | None:
        """The node of the user's newest connected device (all are on one node, but
        while a user moves the newest is where the router sends it now)."""
        newest = self._table.newest_online(user)
        return newest.node_id if newest is not None else None

    def online_devices(self, users: list[str]) -> Deferred[dict[str, list[str]]]:
        table = self._table
        return defer.succeed(
            {
                user: sorted(record.device for record in table.online_sessions(user))
                for user in users
                if user in table.online
            }
        )

    def online_users(self, offset: int, limit: int) -> Deferred[tuple[int, list[str]]]:
        if offset < 0 or limit < 0:
            return defer.fail(ValueError("offset and limit must not be negative"))
        # Sorting on demand keeps logins cheap; only the admin pays, per page asked.
        names = sorted(self._table.online)
        return defer.succeed((len(names), names[offset : offset + limit]))

    def online_count_by_node(self) -> Deferred[dict[str, int]]:
        return defer.succeed(
            {node: len(users) for node, users in self._table.online_per_node.items()}
        )

    def refresh_sessions(self, node_id: str, records: list[SessionRecord]) -> Deferred[None]:
        """Put back the online entry of any live session the node still holds.

        Routes here never expire (this process is the only node, and it cannot crash
        without losing them), so there is no TTL to extend. Nor can this store lose a
        session behind the node's back: a missing session has ended and its listeners
        were told, so it stays ended rather than coming back from a stale list.
        """
        table = self._table
        for record in records:
            if record.node_id != node_id:
                continue
            current = table.current(record.user, record.device)
            current_hash = record.token_hash or (current.token_hash if current else None)
            if current_hash is None:
                continue
            live = table.live(current_hash)
            if live is None or live.session_id != record.session_id:
                continue
            if not table.is_online(live):
                table.set_online(live)
        return defer.succeed(None)
