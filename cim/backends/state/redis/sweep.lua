-- ARGV: prefix, now, batch size, tombstone ttl (ms). Returns the expired sessions.
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
