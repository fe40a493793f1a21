-- ARGV: prefix, node, route ttl (ms), now, grace (ms), tombstone ttl (ms), then six per
-- record: token_hash, session_id, user, device, created_at, expires_at.
-- Returns {token_hash, reason} for each record whose session turns out to be over.
local node, route_ms, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local grace_ms, tombstone_ms = tonumber(ARGV[5]), ARGV[6]
local clock = now_ms()
local ended = {}
for i = 7, #ARGV, 6 do
  local th, sid, user = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local device, created, expires = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local skey = p .. 'session:' .. th
  local dkey = p .. 'devices:' .. user
  local why = redis.call('GET', p .. 'ended:' .. th)
  local current = redis.call('HGET', dkey, device)
  local s = session_fields(th)
  if s and s.session_id ~= sid then
    -- not this session's data (token hashes are unique): leave it alone
  elseif why then
    table.insert(ended, {th, why})
  elseif tonumber(expires) <= now then
    if s then finish(th, s, $EXPIRED, tombstone_ms) else set_offline(user, sid, device) end
    table.insert(ended, {th, $EXPIRED})
  elseif current and current ~= th then
    -- a newer login of the device replaced it while its notification went missing
    if s then finish(th, s, $AGAIN, tombstone_ms) else set_offline(user, sid, device) end
    table.insert(ended, {th, $AGAIN})
  elseif redis.call('HGET', p .. 'route:' .. user, 'node') ~= node
      and redis.call('HLEN', p .. 'route:' .. user) > 1 then
    -- the user's devices are online on another node now (the ring moved the user while
    -- this node lives): this device logs in again and joins them, rather than the two
    -- nodes taking the route from each other at every refresh
    if s then finish(th, s, $MOVED, tombstone_ms) end
    table.insert(ended, {th, $MOVED})
  else
    if not s then
      local pttl = int((tonumber(expires) - now) * 1000 + grace_ms)
      write_session(th, sid, user, device, node, created, expires, pttl)
      if not current then set_current(user, device, th, pttl) end
    elseif not current then
      local left = redis.call('PTTL', skey)
      if left <= 0 then left = int(grace_ms) end
      set_current(user, device, th, left)
    end
    set_online(user, sid, device, node, route_ms, clock)
  end
end
return ended
