-- Prepended to every script (scripts.py). ARGV[1] is always the key prefix.
-- Keys: session:<token hash> (a hash), devices:<user> (device -> token hash of its
-- current session), route:<user> (node, and d:<device> -> session id per device
-- online), online:<node> and online (sorted sets of users), nodes, ended:<token hash>,
-- ticket:<id> (a resumption ticket redeemed, kept until the ticket expires).
-- The dollar-sign names (EXPIRED, ELSEWHERE, AGAIN, MOVED, REFUSE_NEW) are replaced when the scripts
-- are loaded by Lua string literals of the reasons and policy in cim.backends.state.

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

-- A device online on node; a user moved to another node leaves its old node's
-- devices behind (that node is gone or lets them go).
local function set_online(user, sid, device, node, route_ms, clock)
  local rkey = p .. 'route:' .. user
  local old = redis.call('HGET', rkey, 'node')
  if old and old ~= node then
    drop_online(user, old)
    redis.call('DEL', rkey)
  end
  redis.call('HSET', rkey, 'node', node, 'd:' .. device, sid)
  redis.call('PEXPIRE', rkey, route_ms)
  redis.call('ZADD', p .. 'online:' .. node, int(clock + tonumber(route_ms)), user)
  redis.call('ZADD', p .. 'online', 0, user)
  redis.call('SADD', p .. 'nodes', node)
end

-- The device's connection is gone; the user stays online while another device is.
local function set_offline(user, sid, device)
  local rkey = p .. 'route:' .. user
  local field = 'd:' .. device
  if redis.call('HGET', rkey, field) ~= sid then return 0 end
  redis.call('HDEL', rkey, field)
  if redis.call('HLEN', rkey) <= 1 then
    local node = redis.call('HGET', rkey, 'node')
    redis.call('DEL', rkey)
    if node then drop_online(user, node) end
    redis.call('ZREM', p .. 'online', user)
  end
  return 1
end

-- The device's session is its current one (devices:<user> names its token hash).
local function set_current(user, device, th, pttl)
  local dkey = p .. 'devices:' .. user
  redis.call('HSET', dkey, device, th)
  if redis.call('PTTL', dkey) < tonumber(pttl) then redis.call('PEXPIRE', dkey, pttl) end
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
  local dkey = p .. 'devices:' .. s.user
  if redis.call('HGET', dkey, s.device) == th then redis.call('HDEL', dkey, s.device) end
  set_offline(s.user, s.session_id, s.device)
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
