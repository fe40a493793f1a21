"""The shared IStateStore: sessions, routes and the online set in Redis, for a cluster.

Every decision that reads and then writes (duplicate login, marking a connection
offline, rewriting lost state) runs as one Lua script, so Redis applies it atomically
and two nodes racing on the same user cannot both win.

txredisapi is wrapped rather than used through its connection helpers, whose defaults
bite a server: with no reply timeout a call can wait forever on a hung Redis, and while
disconnected a lazy connection queues calls until Redis is back. Here every command has
a reply timeout, a call made while Redis is unreachable fails at once with
StateUnavailable (the router turns that into a 503), and the two connections (commands
and notifications) are re-established for as long as the store runs, with a capped
backoff and one log line per change of state rather than per attempt.

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

The scripts build key names from the prefix, so they need a single Redis (or a
primary behind Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.backends.state.memory import (
    KICK_OLD,
    REASON_EXPIRED,
    REASON_LOGGED_IN_ELSEWHERE,
    REFUSE_NEW,
)
from cim.interfaces import (
    AlreadyLoggedIn,
    IStateStore,
    MessageReceipt,
    SessionEndedListener,
    SessionRecord,
    StateUnavailable,
)
from cim.message_ids import MAX_NODE_NUMBER

DEFAULT_PREFIX = "cim:"
SESSION_GRACE = 3600.0
"""Seconds a session's data outlives its expiry, so the sweep can announce it."""
REFRESH_BATCH = 500
"""Records per refresh script: bounds how long one script holds Redis."""
SWEEP_BATCH = 1000
TOLD_MEMORY = 10_000
"""Session ids remembered as already told, to drop the echo of our own publications."""

_log = Logger(namespace="cim.state.redis")


# --- where Redis is ------------------------------------------------------------------


@dataclass(frozen=True)
class RedisAddress:
    """A parsed redis:// or unix:// URL; its str and repr never show the password."""

    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        if self.unix_path is not None:
            return UNIXClientEndpoint(reactor, self.unix_path, timeout=timeout)
        # IP literals skip name resolution (which would need the reactor's resolver).
        if isIPAddress(self.host):
            return TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        if isIPv6Address(self.host):
            return TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def parse_redis_url(url: str) -> RedisAddress:
    """redis://[[user]:password@]host[:port][/db] or unix:///path[?db=N]."""
    parts = urlsplit(url)
    try:
        if parts.scheme == "unix":
            path = parts.netloc + parts.path
            if not path:
                raise ValueError("a unix:// URL needs a socket path")
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            return RedisAddress(
                unix_path=path,
                db=db,
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
            )
        if parts.scheme != "redis":
            raise ValueError("expected redis:// or unix://")
        db_text = parts.path.lstrip("/")
        return RedisAddress(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(db_text) if db_text else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )
    except ValueError as exc:
        # The URL may hold a password: name the problem, never echo the URL.
        raise ValueError(f"not a usable Redis URL: {exc}") from None


# --- connections ---------------------------------------------------------------------


class _CommandProtocol(txredisapi.RedisProtocol):
    pass


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.on_message(channel, message)


class _RedisFactory(Factory):
    """Builds txredisapi protocols bound to our reactor, credentials and timeout.

    txredisapi's protocols schedule their reply timeouts on the global reactor and
    call back into their factory when AUTH or SELECT is refused; this factory gives
    them the injected reactor and turns that call-back into a remembered error (the
    link keeps retrying: an operator may fix the password without restarting us).
    """

    noisy = False
    isLazy = False

    def __init__(
        self,
        protocol_class: type,
        reactor: Any,
        address: RedisAddress,
        reply_timeout: float,
        on_message: Callable[[str, str], None] | None = None,
    ) -> None:
        self._protocol_class = protocol_class
        self._reactor = reactor
        self._address = address
        self._reply_timeout = reply_timeout
        self.on_message = on_message or (lambda channel, message: None)
        self.last_error: str | None = None

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self._protocol_class(
            charset="utf-8",
            replyTimeout=self._reply_timeout,
            password=self._address.password,
            dbid=self._address.db or None,
            convertNumbers=False,
            username=self._address.username,
        )
        protocol.factory = self
        protocol.callLater = self._reactor.callLater
        return protocol

    def stopTrying(self) -> None:
        """txredisapi gives up after a refused AUTH/SELECT; we back off and retry."""

    def connectionError(self, why: str) -> None:
        self.last_error = why


class _Link:
    """One connection to Redis, re-established with a capped backoff until stopped.

    ``protocol`` is the usable connection or None: callers check it and fail fast
    instead of waiting, which is what keeps a Redis outage from piling up requests.
    """

    def __init__(
        self,
        name: str,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        factory: _RedisFactory,
        where: str,
        prepare: Callable[[Any], Deferred[Any]] | None,
        initial_delay: float,
        max_delay: float,
    ) -> None:
        self._name = name
        self._reactor = reactor
        self._endpoint = endpoint
        self._factory = factory
        self._where = where
        self._prepare = prepare
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self.protocol: Any = None
        self._connecting: Any = None
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._running = False
        self._reported_up: bool | None = None
        self._waiters: list[Deferred[None]] = []
        self.last_error: str | None = None

    def start(self) -> None:
        if not self._running:
            self._running = True
            self._connect()

    def when_ready(self) -> Deferred[None]:
        if self.protocol is not None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    def stop(self) -> Deferred[None]:
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        connection = self._connecting or self.protocol
        self.protocol = None
        self._connecting = None
        if connection is None or not connection.connected:
            return defer.succeed(None)
        lost: Deferred[Any] = connection.whenDisconnected()
        connection.transport.loseConnection()
        return lost.addCallback(lambda _: None)

    # --- the loop ---------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        self._factory.last_error = None
        attempt = self._endpoint.connect(self._factory)
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, protocol: Any) -> None:
        self._attempt = None
        if not self._running:
            protocol.transport.loseConnection()
            return
        if not protocol.connected:
            self._failed("connection closed at once")
            return
        self._connecting = protocol
        protocol.whenDisconnected().addCallback(lambda _: self._lost(protocol))
        ready: Deferred[Any] = protocol.whenConnected()  # after AUTH and SELECT
        if self._prepare is not None:
            prepare = self._prepare
            ready.addCallback(lambda _: prepare(protocol))
        ready.addCallbacks(
            lambda _: self._usable(protocol), self._prepare_failed, errbackArgs=(protocol,)
        )

    def _prepare_failed(self, failure: Failure, protocol: Any) -> None:
        self._factory.last_error = failure.getErrorMessage()
        if protocol.connected:
            protocol.transport.abortConnection()

    def _usable(self, protocol: Any) -> None:
        if not self._running or not protocol.connected or self._connecting is not protocol:
            return
        self._connecting = None
        self.protocol = protocol
        self._failures = 0
        self.last_error = None
        self._report(True)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self._running:
            return
        self._failed(failure.getErrorMessage())

    def _lost(self, protocol: Any) -> None:
        was_usable = self.protocol is protocol
        if was_usable:
            self.protocol = None
        if self._connecting is protocol:
            self._connecting = None
        if not self._running:
            return
        if was_usable:
            # A working connection dropped: try again soon, then back off.
            self._failures = 0
            self._failed("connection lost")
        else:
            self._failed(self._factory.last_error or "connection closed before it was ready")

    def _failed(self, why: str) -> None:
        self.last_error = why
        self._report(False)
        self._failures += 1
        delay = min(self._max_delay, self._initial_delay * 2 ** min(self._failures - 1, 30))
        # Jitter keeps a fleet of nodes from reconnecting in lockstep after an outage.
        delay *= random.uniform(0.8, 1.0)
        self._retry = self._reactor.callLater(delay, self._connect)

    def _report(self, up: bool) -> None:
        if self._reported_up is up:
            return
        first = self._reported_up is None
        self._reported_up = up
        if up:
            _log.info(
                "state store: {link} connection to Redis at {where} is {state}",
                link=self._name,
                where=self._where,
                state="up" if first else "back",
            )
        elif first:
            _log.warn(
                "state store: cannot open the {link} connection to Redis at {where} ({why}); "
                "retrying",
                link=self._name,
                where=self._where,
                why=self.last_error,
            )
        else:
            _log.warn(
                "state store: lost the {link} connection to Redis at {where} ({why}); "
                "state calls fail until it is back, retrying at most every {cap} s",
                link=self._name,
                where=self._where,
                why=self.last_error,
                cap=self._max_delay,
            )


# --- the scripts ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str


def _script(body: str) -> _Script:
    source = (
        (_PRELUDE + body)
        .replace("$EXPIRED", json.dumps(REASON_EXPIRED))
        .replace("$ELSEWHERE", json.dumps(REASON_LOGGED_IN_ELSEWHERE))
        .replace("$REFUSE_NEW", json.dumps(REFUSE_NEW))
    )
    return _Script(source, hashlib.sha1(source.encode()).hexdigest())


# ARGV[1] is always the key prefix.
_PRELUDE = """
local p = ARGV[1]

local function session_fields(th)
  local flat = redis.call('HGETALL', p .. 'session:' .. th)
  if #flat == 0 then return nil end
  local s = {}
  for i = 1, #flat, 2 do s[flat[i]] = flat[i + 1] end
  return s
end

local function as_list(s)
  return {s.session_id, s.user, s.device, s.node_id, s.created_at, s.expires_at, s.token_hash}
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(n)
  return string.format('%d', math.floor(n))
end

local function drop_online(user, node)
  local key = p .. 'online:' .. node
  redis.call('ZREM', key, user)
  if redis.call('ZCARD', key) == 0 then redis.call('SREM', p .. 'nodes', node) end
end

local function set_online(user, sid, node, route_ms, clock)
  local rkey = p .. 'route:' .. user
  local old = redis.call('HGET', rkey, 'node')
  if old and old ~= node then drop_online(user, old) end
  redis.call('HSET', rkey, 'node', node, 'sid', sid)
  redis.call('PEXPIRE', rkey, route_ms)
  redis.call('ZADD', p .. 'online:' .. node, int(clock + tonumber(route_ms)), user)
  redis.call('ZADD', p .. 'online', 0, user)
  redis.call('SADD', p .. 'nodes', node)
end

local function set_offline(user, sid)
  local rkey = p .. 'route:' .. user
  local route = redis.call('HMGET', rkey, 'node', 'sid')
  if route[2] ~= sid then return 0 end
  redis.call('DEL', rkey)
  drop_online(user, route[1])
  redis.call('ZREM', p .. 'online', user)
  return 1
end

local function write_session(th, sid, user, device, node, created, expires, pttl)
  local skey = p .. 'session:' .. th
  redis.call('HSET', skey, 'session_id', sid, 'user', user, 'device', device,
    'node_id', node, 'created_at', created, 'expires_at', expires, 'token_hash', th)
  redis.call('PEXPIRE', skey, pttl)
  redis.call('ZADD', p .. 'expiry', expires, th)
end

local function finish(th, s, reason, tombstone_ms)
  redis.call('DEL', p .. 'session:' .. th)
  redis.call('ZREM', p .. 'expiry', th)
  local ukey = p .. 'user:' .. s.user
  if redis.call('GET', ukey) == th then redis.call('DEL', ukey) end
  set_offline(s.user, s.session_id)
  redis.call('SET', p .. 'ended:' .. th, reason, 'PX', tombstone_ms)
  redis.call('PUBLISH', p .. 'session-ended', cjson.encode({
    session_id = s.session_id, user = s.user, device = s.device, node_id = s.node_id,
    created_at = s.created_at, expires_at = s.expires_at, token_hash = th,
    reason = reason}))
end

-- A logout or kick; a session already past its expiry is reported as expired.
local function end_session(th, s, now, reason, tombstone_ms)
  if tonumber(s.expires_at) <= now then
    finish(th, s, $EXPIRED, tombstone_ms)
    return {'expired', as_list(s)}
  end
  finish(th, s, reason, tombstone_ms)
  return {'ended', as_list(s)}
end
"""

# ARGV: prefix, token_hash, user, device, node, now, expires_at, policy, session_id,
# session pttl (ms), tombstone ttl (ms).
_CREATE = _script("""
local th, user, device, node = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now, expires, policy, sid = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
local pttl, tombstone_ms = ARGV[10], ARGV[11]
if redis.call('EXISTS', p .. 'session:' .. th) == 1 then return {'taken'} end
local previous, expired = {}, {}
local old_th = redis.call('GET', p .. 'user:' .. user)
if old_th then
  local old = session_fields(old_th)
  if old then
    if tonumber(old.expires_at) <= now then
      finish(old_th, old, $EXPIRED, tombstone_ms)
      expired = as_list(old)
    elseif policy == $REFUSE_NEW
        and redis.call('HGET', p .. 'route:' .. user, 'sid') == old.session_id then
      return {'refused'}
    else
      finish(old_th, old, $ELSEWHERE, tombstone_ms)
      previous = as_list(old)
    end
  end
end
write_session(th, sid, user, device, node, ARGV[6], expires, pttl)
redis.call('SET', p .. 'user:' .. user, th, 'PX', pttl)
return {'ok', previous, expired}
""")

# ARGV: prefix, token_hash, now, tombstone ttl (ms).
_LOOKUP = _script("""
local th, now = ARGV[2], tonumber(ARGV[3])
local s = session_fields(th)
if not s then return false end
if tonumber(s.expires_at) <= now then
  finish(th, s, $EXPIRED, ARGV[4])
  return {'expired', as_list(s)}
end
return {'ok', as_list(s)}
""")

# ARGV: prefix, token_hash, now, reason, tombstone ttl (ms).
_END = _script("""
local th, now, reason = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local s = session_fields(th)
if not s then return false end
return end_session(th, s, now, reason, ARGV[5])
""")

# ARGV: prefix, user, now, reason, tombstone ttl (ms). The user's session, whatever
# its token: an administrator's kick.
_END_USER = _script("""
local user, now, reason = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local th = redis.call('GET', p .. 'user:' .. user)
if not th then return false end
local s = session_fields(th)
if not s then return false end
return end_session(th, s, now, reason, ARGV[5])
""")

# ARGV: prefix, user, session_id, node, route ttl (ms).
_MARK_ONLINE = _script("""
local user, sid, node = ARGV[2], ARGV[3], ARGV[4]
local th = redis.call('GET', p .. 'user:' .. user)
if not th or redis.call('HGET', p .. 'session:' .. th, 'session_id') ~= sid then
  return 0
end
set_online(user, sid, node, ARGV[5], now_ms())
return 1
""")

# ARGV: prefix, user, session_id, node.
_MARK_OFFLINE = _script("""
local user, sid, node = ARGV[2], ARGV[3], ARGV[4]
if set_offline(user, sid) == 1 then return 1 end
local holder = redis.call('HGET', p .. 'route:' .. user, 'node')
if not holder then
  drop_online(user, node)
  redis.call('ZREM', p .. 'online', user)
elseif holder ~= node then
  drop_online(user, node)
end
return 0
""")

# ARGV: prefix, node, route ttl (ms), now, grace (ms), tombstone ttl (ms), then six per
# record: token_hash, session_id, user, device, created_at, expires_at.
# Returns {token_hash, reason} for each record whose session turns out to be over.
_REFRESH = _script("""
local node, route_ms, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local grace_ms, tombstone_ms = tonumber(ARGV[5]), ARGV[6]
local clock = now_ms()
local ended = {}
for i = 7, #ARGV, 6 do
  local th, sid, user = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local device, created, expires = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local skey = p .. 'session:' .. th
  local ukey = p .. 'user:' .. user
  local why = redis.call('GET', p .. 'ended:' .. th)
  local current = redis.call('GET', ukey)
  local s = session_fields(th)
  if s and s.session_id ~= sid then
    -- not this session's data (token hashes are unique): leave it alone
  elseif why then
    table.insert(ended, {th, why})
  elseif tonumber(expires) <= now then
    if s then finish(th, s, $EXPIRED, tombstone_ms) else set_offline(user, sid) end
    table.insert(ended, {th, $EXPIRED})
  elseif current and current ~= th then
    -- a newer login replaced it while its notification went missing
    if s then finish(th, s, $ELSEWHERE, tombstone_ms) else set_offline(user, sid) end
    table.insert(ended, {th, $ELSEWHERE})
  else
    if not s then
      local pttl = int((tonumber(expires) - now) * 1000 + grace_ms)
      write_session(th, sid, user, device, node, created, expires, pttl)
      if not current then redis.call('SET', ukey, th, 'PX', pttl) end
    elseif not current then
      local left = redis.call('PTTL', skey)
      if left <= 0 then left = int(grace_ms) end
      redis.call('SET', ukey, th, 'PX', left)
    end
    set_online(user, sid, node, route_ms, clock)
  end
end
return ended
""")

# ARGV: prefix, now, batch size, tombstone ttl (ms). Returns the expired sessions.
_SWEEP = _script("""
local limit, tombstone_ms = tonumber(ARGV[3]), ARGV[4]
local out = {}
local due = redis.call('ZRANGEBYSCORE', p .. 'expiry', '-inf', ARGV[2], 'LIMIT', 0, limit)
for _, th in ipairs(due) do
  local s = session_fields(th)
  if s then
    finish(th, s, $EXPIRED, tombstone_ms)
    table.insert(out, as_list(s))
  else
    redis.call('ZREM', p .. 'expiry', th)
  end
end
-- online entries whose route expired without a mark_offline (their node died)
local clock = now_ms()
for _, node in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local key = p .. 'online:' .. node
  local stale = redis.call('ZRANGEBYSCORE', key, '-inf', int(clock), 'LIMIT', 0, limit)
  for _, user in ipairs(stale) do
    local rkey = p .. 'route:' .. user
    local holder = redis.call('HGET', rkey, 'node')
    local left = redis.call('PTTL', rkey)
    if holder == node and left > 0 then
      redis.call('ZADD', key, int(clock + left), user)
    else
      redis.call('ZREM', key, user)
      if not holder then redis.call('ZREM', p .. 'online', user) end
    end
  end
  if redis.call('ZCARD', key) == 0 then redis.call('SREM', p .. 'nodes', node) end
end
return out
""")

# ARGV: prefix, offset, limit.
_ONLINE_USERS = _script("""
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local total = redis.call('ZCARD', p .. 'online')
if limit == 0 then return {total, {}} end
return {total, redis.call('ZRANGE', p .. 'online', offset, offset + limit - 1)}
""")

# ARGV: prefix. Returns node, count, node, count, ...
# ARGV: prefix, node id, highest number. A node keeps its number across restarts;
# numbers are never handed out twice, so message ids of two nodes never collide.
_NODE_NUMBER = _script("""
local known = redis.call('HGET', p .. 'node-numbers', ARGV[2])
if known then return known end
local number = redis.call('INCR', p .. 'node-number-seq')
if number > tonumber(ARGV[3]) then
  return redis.error_reply('no node numbers left: ' .. ARGV[3] .. ' node ids were used')
end
redis.call('HSET', p .. 'node-numbers', ARGV[2], number)
return number
""")

# ARGV: prefix, user... Returns each user's node, or false when offline.
_ROUTES = _script("""
local nodes = {}
for i = 2, #ARGV do
  nodes[i - 1] = redis.call('HGET', p .. 'route:' .. ARGV[i], 'node')
end
return nodes
""")

# ARGV: prefix, key suffix, msg_id, sent_at_ms, ttl (ms). Returns nil the first time,
# else {msg_id, sent_at_ms, status, reason}.
_REMEMBER = _script("""
local key = p .. 'sent:' .. ARGV[2]
local known = redis.call('HMGET', key, 'msg_id', 'sent_at_ms', 'status', 'reason')
if known[1] then return known end
redis.call('HSET', key, 'msg_id', ARGV[3], 'sent_at_ms', ARGV[4], 'status', '0', 'reason', '')
redis.call('PEXPIRE', key, ARGV[5])
return nil
""")

# ARGV: prefix, key suffix, status, reason.
_OUTCOME = _script("""
local key = p .. 'sent:' .. ARGV[2]
local current = redis.call('HGET', key, 'status')
if not current then return 0 end
-- A stale failure (say from a restarted node draining its queue) never undoes a success.
if ARGV[3] == '3' and (current == '1' or current == '2' or current == '4') then return 0 end
redis.call('HSET', key, 'status', ARGV[3], 'reason', ARGV[4])
return 1
""")

_COUNT_BY_NODE = _script("""
local clock = int(now_ms())
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local n = redis.call('ZCOUNT', p .. 'online:' .. node, '(' .. clock, '+inf')
  if n > 0 then
    table.insert(out, node)
    table.insert(out, n)
  end
end
return out
""")


# --- the store -----------------------------------------------------------------------


@implementer(IStateStore)
class RedisStateStore:
    """Sessions, routes and the online set shared by every node through one Redis.

    ``reactor`` does the networking and the timeouts; ``clock`` (the reactor unless
    given) supplies session times, so tests can expire sessions without waiting.
    Route deadlines use Redis's own clock, so nodes with skewed clocks still agree on
    whose route is alive.
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

    def __init__(
        self,
        reactor: Any,
        redis_url: str,
        reply_timeout: float,
        route_ttl: float,
        *,
        clock: IReactorTime | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        sweep_interval: float | None = None,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 5.0,
        dedup_window: float = 600.0,
    ) -> None:
        self._reactor = reactor
        self._dedup_window = dedup_window
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._address = parse_redis_url(redis_url)
        self._timeout = reply_timeout
        self._route_ms = str(int(route_ttl * 1000))
        self._tombstone_ms = str(int(max(3 * route_ttl, 60.0) * 1000))
        self._grace_ms = str(int(SESSION_GRACE * 1000))
        self._prefix = key_prefix
        self._channel = key_prefix + "session-ended"
        self._sweep_interval = (
            sweep_interval if sweep_interval is not None else max(1.0, min(60.0, route_ttl / 3))
        )
        where = str(self._address)
        self._where = where
        endpoint = self._address.endpoint(reactor, reply_timeout)
        self._commands = _Link(
            "command",
            reactor,
            endpoint,
            _RedisFactory(_CommandProtocol, reactor, self._address, reply_timeout),
            where,
            _ping,
            reconnect_delay,
            max_reconnect_delay,
        )
        self._subscriber = _Link(
            "notification",
            reactor,
            endpoint,
            _RedisFactory(
                _SubscriberProtocol, reactor, self._address, reply_timeout, self._notified
            ),
            where,
            self._subscribe,
            reconnect_delay,
            max_reconnect_delay,
        )
        self._listeners: list[SessionEndedListener] = []
        self._told: OrderedDict[str, None] = OrderedDict()
        self._housekeeping = LoopingCall(self._keep_house)
        self._housekeeping.clock = reactor
        self._started: Deferred[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether calls can reach Redis right now (both connections are up)."""
        return self._commands.protocol is not None and self._subscriber.protocol is not None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect; fails with StateUnavailable if Redis is not reached in time.

        Only start-up insists on Redis: once started, the store survives outages.
        """
        if self._started is not None:
            return self._started
        self._commands.start()
        self._subscriber.start()
        ready = defer.gatherResults(
            [self._commands.when_ready(), self._subscriber.when_ready()], consumeErrors=True
        )
        ready.addTimeout(self._timeout, self._reactor)

        def started(_: object) -> None:
            self._housekeeping.start(self._sweep_interval, now=False)

        def failed(failure: Failure) -> Deferred[None]:
            why = self._commands.last_error or self._subscriber.last_error or "no answer"
            self._started = None
            stopped = self._stop_links()

            def unavailable(_: object) -> None:
                raise StateUnavailable(
                    f"cannot reach Redis at {self._where} within {self._timeout:g} s ({why})"
                )

            return stopped.addCallback(unavailable)

        outcome: Deferred[None] = ready.addCallbacks(started, failed)
        self._started = outcome
        return outcome

    def stop(self) -> Deferred[None]:
        if self._housekeeping.running:
            self._housekeeping.stop()
        self._started = None
        return self._stop_links()

    def _stop_links(self) -> Deferred[None]:
        d = defer.gatherResults(
            [self._commands.stop(), self._subscriber.stop()], consumeErrors=True
        )
        return d.addCallback(lambda _: None)

    # --- IStateStore ------------------------------------------------------------------

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
        now = self._clock.seconds()
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
        d = self._eval(
            _CREATE,
            token_hash,
            user,
            device,
            node_id,
            repr(record.created_at),
            repr(record.expires_at),
            policy,
            record.session_id,
            pttl,
            self._tombstone_ms,
        )

        def decided(reply: list[Any]) -> tuple[SessionRecord, SessionRecord | None]:
            if reply[0] == "taken":
                # Only a broken token generator gets here; never let one login take over another.
                raise ValueError("token hash already in use")
            if reply[0] == "refused":
                raise AlreadyLoggedIn(user)
            previous = _record(reply[1]) if reply[1] else None
            if reply[2]:
                self._tell(_record(reply[2]), REASON_EXPIRED)
            if previous is not None:
                self._tell(previous, REASON_LOGGED_IN_ELSEWHERE)
            return record, previous

        return d.addCallback(decided)

    def session_for_token(self, token_hash: str) -> Deferred[SessionRecord | None]:
        d = self._eval(_LOOKUP, token_hash, repr(self._clock.seconds()), self._tombstone_ms)
        return d.addCallback(self._live_or_told)

    def end_session(self, token_hash: str, reason: str) -> Deferred[SessionRecord | None]:
        d = self._eval(_END, token_hash, repr(self._clock.seconds()), reason, self._tombstone_ms)
        return d.addCallback(self._ended, reason)

    def end_user_session(self, user: str, reason: str) -> Deferred[SessionRecord | None]:
        d = self._eval(_END_USER, user, repr(self._clock.seconds()), reason, self._tombstone_ms)
        return d.addCallback(self._ended, reason)

    def _ended(self, reply: list[Any] | None, reason: str) -> SessionRecord | None:
        if reply is None:
            return None
        record = _record(reply[1])
        if reply[0] == "expired":
            self._tell(record, REASON_EXPIRED)
            return None
        self._tell(record, reason)
        return record

    def mark_online(self, record: SessionRecord) -> Deferred[None]:
        d = self._eval(_MARK_ONLINE, record.user, record.session_id, record.node_id, self._route_ms)
        return d.addCallback(lambda _: None)

    def mark_offline(self, record: SessionRecord) -> Deferred[None]:
        d = self._eval(_MARK_OFFLINE, record.user, record.session_id, record.node_id)
        return d.addCallback(lambda _: None)

    def route(self, user: str) -> Deferred[str | None]:
        return self._command("HGET", self._prefix + "route:" + user, "node")

    def routes(self, users: list[str]) -> Deferred[dict[str, str]]:
        if not users:
            return defer.succeed({})
        d = self._eval(_ROUTES, *users)

        def pair(nodes: list[Any]) -> dict[str, str]:
            return {user: node for user, node in zip(users, nodes, strict=True) if node}

        return d.addCallback(pair)

    def online_users(self, offset: int, limit: int) -> Deferred[tuple[int, list[str]]]:
        if offset < 0 or limit < 0:
            return defer.fail(ValueError("offset and limit must not be negative"))
        d = self._eval(_ONLINE_USERS, str(offset), str(limit))
        return d.addCallback(lambda reply: (int(reply[0]), list(reply[1])))

    def online_count_by_node(self) -> Deferred[dict[str, int]]:
        d = self._eval(_COUNT_BY_NODE)
        return d.addCallback(
            lambda flat: {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        )

    def add_session_ended_listener(self, listener: SessionEndedListener) -> None:
        self._listeners.append(listener)

    def remember_message(
        self, sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> Deferred[MessageReceipt | None]:
        d = self._eval(
            _REMEMBER,
            _sent_key(sender, device, client_seq),
            str(msg_id),
            str(sent_at_ms),
            str(int(self._dedup_window * 1000)),
        )

        def receipt(reply: list[Any] | None) -> MessageReceipt | None:
            if not reply:
                return None
            msg, sent_at, status, reason = reply
            return MessageReceipt(int(msg), int(sent_at), int(status or 0), reason or "")

        return d.addCallback(receipt)

    def node_number(self, node_id: str) -> Deferred[int]:
        d = self._eval(_NODE_NUMBER, node_id, str(MAX_NODE_NUMBER))
        return d.addCallback(int)

    def next_group_seq(self, group: str) -> Deferred[int]:
        d = self._command("INCR", self._prefix + "gseq:" + group)
        return d.addCallback(int)

    def record_outcome(
        self, sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> Deferred[None]:
        d = self._eval(_OUTCOME, _sent_key(sender, device, client_seq), str(status), reason)
        return d.addCallback(lambda _: None)

    def refresh_sessions(self, node_id: str, records: list[SessionRecord]) -> Deferred[None]:
        """Extend routes and rewrite what Redis lost, in batches of one script each.

        A record whose session turns out to be over (logged out, replaced, expired
        while this node missed the notification) is not brought back: its listeners
        are told instead, so the node drops the connection.
        """
        mine = [r for r in records if r.node_id == node_id and r.token_hash]
        if not mine:
            return defer.succeed(None)
        now = repr(self._clock.seconds())
        batches = []
        for start in range(0, len(mine), REFRESH_BATCH):
            batch = mine[start : start + REFRESH_BATCH]
            args: list[str] = [node_id, self._route_ms, now, self._grace_ms, self._tombstone_ms]
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
            d = self._eval(_REFRESH, *args)
            d.addCallback(self._tell_ended, by_hash)
            batches.append(d)
        done = defer.gatherResults(batches, consumeErrors=True)
        return done.addCallbacks(lambda _: None, _first_failure)

    # --- housekeeping -----------------------------------------------------------------

    def sweep(self) -> Deferred[int]:
        """End sessions past their expiry and drop online entries of dead routes.

        Every node sweeps; the script is atomic, so each expired session is ended
        (and announced) exactly once across the cluster.
        """
        d = self._eval(_SWEEP, repr(self._clock.seconds()), str(SWEEP_BATCH), self._tombstone_ms)

        def expired(reply: list[Any]) -> int:
            for item in reply:
                self._tell(_record(item), REASON_EXPIRED)
            return len(reply)

        return d.addCallback(expired)

    def _keep_house(self) -> Deferred[None]:
        d = self.sweep()
        d.addCallback(lambda _: self._ping_subscriber())

        def failed(failure: Failure) -> None:
            # An outage is already logged by the link, once; don't repeat it per run.
            if not failure.check(StateUnavailable):
                _log.failure("state store housekeeping failed", failure)

        return d.addCallbacks(lambda _: None, failed)

    def _ping_subscriber(self) -> None:
        """A silent notification connection could be dead: make it answer or reconnect."""
        protocol = self._subscriber.protocol
        if protocol is not None:
            # A ping that times out aborts the connection (txredisapi's reply timeout),
            # which the link then re-establishes.
            protocol.execute_command("PING").addErrback(lambda _: None)

    # --- notifications ----------------------------------------------------------------

    def _subscribe(self, protocol: Any) -> Deferred[Any]:
        d: Deferred[Any] = protocol.subscribe(self._channel)
        return d.addTimeout(self._timeout, self._reactor)

    def _notified(self, channel: str, message: str) -> None:
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
        self._tell(record, reason)

    def _tell_ended(self, reply: list[Any], by_hash: dict[str, SessionRecord]) -> None:
        for token_hash, reason in reply:
            record = by_hash.get(token_hash)
            if record is not None:
                self._tell(record, reason)

    def _tell(self, record: SessionRecord, reason: str) -> None:
        """Call the listeners, once per session on this node.

        A session this store ended itself is told here at once and then comes back
        as the echo of its own publication; a refresh may find an ending this node
        was also notified of. The memory of told session ids drops the repeats.
        """
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

    def _live_or_told(self, reply: list[Any] | None) -> SessionRecord | None:
        if reply is None:
            return None
        record = _record(reply[1])
        if reply[0] == "expired":
            self._tell(record, REASON_EXPIRED)
            return None
        return record

    # --- talking to Redis -------------------------------------------------------------

    def _connection(self) -> Any:
        protocol = self._commands.protocol
        if protocol is None:
            why = self._commands.last_error
            detail = f" ({why})" if why else ""
            if self._started is None:
                raise StateUnavailable(f"the state store is not connected to {self._where}")
            raise StateUnavailable(f"Redis at {self._where} is unreachable{detail}")
        return protocol

    def _command(self, *args: str) -> Deferred[Any]:
        try:
            d: Deferred[Any] = self._connection().execute_command(*args)
        except (StateUnavailable, txredisapi.ConnectionError) as exc:
            return defer.fail(_unavailable_error(exc))
        return d.addErrback(_unavailable)

    def _eval(self, script: _Script, *args: str) -> Deferred[Any]:
        """EVALSHA, and EVAL once when Redis does not know the script (NOSCRIPT)."""
        try:
            connection = self._connection()
            d: Deferred[Any] = connection.execute_command(
                "EVALSHA", script.sha, 0, self._prefix, *args
            )
        except (StateUnavailable, txredisapi.ConnectionError) as exc:
            return defer.fail(_unavailable_error(exc))

        def load(failure: Failure) -> Any:
            if failure.check(txredisapi.ResponseError) and str(failure.value).startswith(
                "NOSCRIPT"
            ):
                return connection.execute_command("EVAL", script.source, 0, self._prefix, *args)
            return failure

        return d.addErrback(load).addErrback(_unavailable)


def _sent_key(sender: str, device: str, client_seq: int) -> str:
    # Lengths first, so no user or device name can make two triples collide.
    return f"{len(sender)}:{sender}:{len(device)}:{device}:{client_seq}"


def _ping(protocol: Any) -> Deferred[Any]:
    """A connection counts as up once Redis answers on it, not when TCP connects.

    The kernel accepts connections for a hung (or stopped) Redis; without this check
    such a connection would look usable until its first call timed out, and the link
    would flap between up and down instead of backing off.
    """
    d: Deferred[Any] = protocol.execute_command("PING")
    return d


def _record(fields: list[Any]) -> SessionRecord:
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


def _unavailable_error(exc: BaseException) -> StateUnavailable:
    if isinstance(exc, StateUnavailable):
        return exc
    if isinstance(exc, txredisapi.TimeoutError):
        return StateUnavailable(f"Redis did not answer in time: {exc}")
    if isinstance(exc, txredisapi.ConnectionError):
        return StateUnavailable(f"the connection to Redis failed: {exc}")
    return StateUnavailable(f"Redis refused the call: {exc}")


def _unavailable(failure: Failure) -> Failure:
    """Whatever went wrong talking to Redis, callers see one exception type."""
    if failure.check(txredisapi.RedisError) and failure.value is not None:
        return Failure(_unavailable_error(failure.value))
    return failure


def _first_failure(failure: Failure) -> Failure:
    """gatherResults wraps the first failure; callers want the StateUnavailable itself."""
    if isinstance(failure.value, defer.FirstError):
        sub: Failure = failure.value.subFailure
        return sub
    return failure
