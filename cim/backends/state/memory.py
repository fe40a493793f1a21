"""The embedded IStateStore: everything in this process, for a single node.

Every entry is reachable from a live session and is removed when that session ends,
so memory follows the number of live sessions, never the number of logins made.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Self

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from cim.interfaces import (
    AlreadyLoggedIn,
    IStateStore,
    MessageReceipt,
    SessionEndedListener,
    SessionRecord,
)

_FAILED = 3  # cim_pb2.FAILED; DELIVERED, STORED, ACCEPTED below
_SUCCESS = frozenset((1, 2, 4))

REASON_LOGGED_IN_ELSEWHERE = "logged in elsewhere"
REASON_LOGGED_OUT = "logged out"
REASON_EXPIRED = "expired"
REASON_KICKED_BY_ADMIN = "kicked by an administrator"

KICK_OLD = "kick_old"
REFUSE_NEW = "refuse_new"


@implementer(IStateStore)
class MemoryStateStore:
    """Sessions keyed by token hash, one current session per user.

    Expiry is enforced on every lookup, so correctness never waits for the prune;
    the periodic prune (``start``/``stop``) only gives back the memory of sessions
    nobody looks up again.
    """

    # The four facets of the state backend (see cim.interfaces); callers reach each
    # through its own name so the backend can be split without touching them.
    @property
    def sessions(self) -> Self:
        return self

    @property
    def presence(self) -> Self:
        return self

    @property
    def receipts(self) -> Self:
        return self

    @property
    def sequences(self) -> Self:
        return self

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, prune_interval: float = 60.0, dedup_window: float = 600.0
    ) -> None:
        self._clock = clock
        self._prune_interval = prune_interval
        self._dedup_window = dedup_window
        self._group_seqs: dict[str, int] = {}
        # (sender, device, client_seq) -> (receipt, forget at); insertion order is
        # time order, so forgetting pops from the front.
        self._receipts: OrderedDict[tuple[str, str, int], tuple[MessageReceipt, float]] = (
            OrderedDict()
        )
        self._sessions: dict[str, SessionRecord] = {}
        self._token_hash_by_user: dict[str, str] = {}
        self._online: dict[str, SessionRecord] = {}
        self._online_per_node: dict[str, int] = {}
        # One queue per TTL, each in creation order. With a monotonic clock that is
        # also expiry order, so the prune pops expired sessions off the front and
        # never walks the live ones.
        self._expiry_queues: dict[float, OrderedDict[str, float]] = {}
        self._listeners: list[SessionEndedListener] = []
        self._pruner = LoopingCall(self.prune_expired)
        self._pruner.clock = clock

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if not self._pruner.running:
            self._pruner.start(self._prune_interval, now=False)

    def stop(self) -> None:
        if self._pruner.running:
            self._pruner.stop()

    def prune_expired(self) -> int:
        """End every session past its expiry; returns how many ended."""
        now = self._clock.seconds()
        receipts = self._receipts
        while receipts:
            key, (_, forget_at) = next(iter(receipts.items()))
            if forget_at > now:
                break
            del receipts[key]
        ended = 0
        for ttl in list(self._expiry_queues):
            queue = self._expiry_queues.get(ttl)
            while queue:
                token_hash, expires_at = next(iter(queue.items()))
                if expires_at > now:
                    break
                self._end(token_hash, REASON_EXPIRED)
                ended += 1
        return ended

    # --- IStateStore ------------------------------------------------------------------

    def remember_message(
        self, sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> Deferred[MessageReceipt | None]:
        key = (sender, device, client_seq)
        known = self._receipts.get(key)
        if known is not None and known[1] > self._clock.seconds():
            return defer.succeed(known[0])
        forget_at = self._clock.seconds() + self._dedup_window
        self._receipts[key] = (MessageReceipt(msg_id, sent_at_ms), forget_at)
        self._receipts.move_to_end(key)
        return defer.succeed(None)

    def node_number(self, node_id: str) -> Deferred[int]:
        # One process, one node: any fixed number is unique.
        return defer.succeed(1)

    def next_group_seq(self, group: str) -> Deferred[int]:
        number = self._group_seqs.get(group, 0) + 1
        self._group_seqs[group] = number
        return defer.succeed(number)

    def record_outcome(
        self, sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> Deferred[None]:
        key = (sender, device, client_seq)
        known = self._receipts.get(key)
        if known is not None:
            receipt, forget_at = known
            if status == _FAILED and receipt.status in _SUCCESS:
                return defer.succeed(None)  # a stale failure never undoes a success
            self._receipts[key] = (
                MessageReceipt(receipt.msg_id, receipt.sent_at_ms, status, reason),
                forget_at,
            )
        return defer.succeed(None)

    def create_session(
        self,
        token_hash: str,
        user: str,
        device: str,
        node_id: str,
        ttl: float,
        policy: str,
    ) -> Deferred[tuple[SessionRecord, SessionRecord | None]]:
        if policy not in (KICK_OLD, REFUSE_NEW):
            return defer.fail(ValueError(f"unknown duplicate-login policy {policy!r}"))
        if token_hash in self._sessions:
            # Only a broken token generator gets here; never let one login take over another.
            return defer.fail(ValueError("token hash already in use"))
        now = self._clock.seconds()
        previous: SessionRecord | None = None
        previous_hash = self._token_hash_by_user.get(user)
        if previous_hash is not None:
            old = self._sessions[previous_hash]
            if old.expires_at <= now:
                self._end(previous_hash, REASON_EXPIRED)
            elif policy == REFUSE_NEW and self._is_online(old):
                return defer.fail(AlreadyLoggedIn(user))
            else:
                previous = self._forget(previous_hash)

        record = SessionRecord(
            session_id=uuid.uuid4().hex,
            user=user,
            device=device,
            node_id=node_id,
            created_at=now,
            expires_at=now + ttl,
            token_hash=token_hash,
        )
        self._sessions[token_hash] = record
        self._token_hash_by_user[user] = token_hash
        queue = self._expiry_queues.setdefault(_lifetime(record), OrderedDict())
        queue[token_hash] = record.expires_at
        # Listeners hear of the kick only once the new session is in place, so a
        # listener that looks the user up sees the state as it now is.
        if previous is not None:
            self._tell_listeners(previous, REASON_LOGGED_IN_ELSEWHERE)
        return defer.succeed((record, previous))

    def session_for_token(self, token_hash: str) -> Deferred[SessionRecord | None]:
        return defer.succeed(self._live(token_hash))

    def end_session(self, token_hash: str, reason: str) -> Deferred[SessionRecord | None]:
        if self._live(token_hash) is None:
            return defer.succeed(None)
        return defer.succeed(self._end(token_hash, reason))

    def end_user_session(self, user: str, reason: str) -> Deferred[SessionRecord | None]:
        token_hash = self._token_hash_by_user.get(user)
        if token_hash is None or self._live(token_hash) is None:
            return defer.succeed(None)
        return defer.succeed(self._end(token_hash, reason))

    def mark_online(self, record: SessionRecord) -> Deferred[None]:
        current_hash = self._token_hash_by_user.get(record.user)
        current = self._sessions.get(current_hash) if current_hash is not None else None
        if current is None or current.session_id != record.session_id:
            # The session ended (kicked, logged out) while its handshake was in flight.
            return defer.succeed(None)
        self._set_online(record)
        return defer.succeed(None)

    def mark_offline(self, record: SessionRecord) -> Deferred[None]:
        online = self._online.get(record.user)
        if (
            online is not None
            and online.session_id == record.session_id
            and online.node_id == record.node_id
        ):
            self._set_offline(record.user)
        return defer.succeed(None)

    def route(self, user: str) -> Deferred[str | None]:
        online = self._online.get(user)
        return defer.succeed(online.node_id if online is not None else None)

    def routes(self, users: list[str]) -> Deferred[dict[str, str]]:
        online = self._online
        return defer.succeed({user: online[user].node_id for user in users if user in online})

    def online_users(self, offset: int, limit: int) -> Deferred[tuple[int, list[str]]]:
        if offset < 0 or limit < 0:
            return defer.fail(ValueError("offset and limit must not be negative"))
        # Sorting on demand keeps logins cheap; only the admin pays, per page asked.
        names = sorted(self._online)
        return defer.succeed((len(names), names[offset : offset + limit]))

    def online_count_by_node(self) -> Deferred[dict[str, int]]:
        return defer.succeed(dict(self._online_per_node))

    def add_session_ended_listener(self, listener: SessionEndedListener) -> None:
        self._listeners.append(listener)

    def refresh_sessions(self, node_id: str, records: list[SessionRecord]) -> Deferred[None]:
        """Put back the online entry of any live session the node still holds.

        Routes here never expire (this process is the only node, and it cannot crash
        without losing them), so there is no TTL to extend. Nor can this store lose a
        session behind the node's back: a missing session has ended and its listeners
        were told, so it stays ended rather than coming back from a stale list.
        """
        for record in records:
            if record.node_id != node_id:
                continue
            current_hash = record.token_hash or self._token_hash_by_user.get(record.user)
            if current_hash is None:
                continue
            live = self._live(current_hash)
            if live is None or live.session_id != record.session_id:
                continue
            if not self._is_online(live):
                self._set_online(live)
        return defer.succeed(None)

    # --- internals --------------------------------------------------------------------

    def _live(self, token_hash: str) -> SessionRecord | None:
        record = self._sessions.get(token_hash)
        if record is None:
            return None
        if record.expires_at <= self._clock.seconds():
            self._end(token_hash, REASON_EXPIRED)
            return None
        return record

    def _is_online(self, record: SessionRecord) -> bool:
        online = self._online.get(record.user)
        return online is not None and online.session_id == record.session_id

    def _end(self, token_hash: str, reason: str) -> SessionRecord | None:
        record = self._forget(token_hash)
        if record is not None:
            self._tell_listeners(record, reason)
        return record

    def _forget(self, token_hash: str) -> SessionRecord | None:
        """Remove every trace of a session, without telling anyone."""
        record = self._sessions.pop(token_hash, None)
        if record is None:
            return None
        if self._token_hash_by_user.get(record.user) == token_hash:
            del self._token_hash_by_user[record.user]
        if self._is_online(record):
            self._set_offline(record.user)
        lifetime = _lifetime(record)
        queue = self._expiry_queues.get(lifetime)
        if queue is not None:
            queue.pop(token_hash, None)
            if not queue:
                del self._expiry_queues[lifetime]
        return record

    def _set_online(self, record: SessionRecord) -> None:
        self._set_offline(record.user)
        self._online[record.user] = record
        self._online_per_node[record.node_id] = self._online_per_node.get(record.node_id, 0) + 1

    def _set_offline(self, user: str) -> None:
        online = self._online.pop(user, None)
        if online is None:
            return
        remaining = self._online_per_node[online.node_id] - 1
        if remaining:
            self._online_per_node[online.node_id] = remaining
        else:
            del self._online_per_node[online.node_id]

    def _tell_listeners(self, record: SessionRecord, reason: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(record, reason)
            except Exception:
                # One faulty listener must not stop the others or corrupt the store.
                self._log.failure(
                    "session-ended listener failed for user {user!r}", user=record.user
                )


def _lifetime(record: SessionRecord) -> float:
    """The queue key, computed the same way on insert and removal so floats match."""
    return record.expires_at - record.created_at
