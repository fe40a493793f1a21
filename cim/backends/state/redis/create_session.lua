-- ARGV: prefix, token_hash, user, device, node, now, expires_at, policy, session_id,
-- session pttl (ms), tombstone ttl (ms), max devices.
-- Returns {'ok', the same device's previous session or {}, expired sessions, sessions
-- of devices offline dropped for room}, or {'refused'} / {'taken'}.
local th, user, device, node = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now, expires, policy, sid = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
local pttl, tombstone_ms, max_devices = ARGV[10], ARGV[11], tonumber(ARGV[12])
if redis.call('EXISTS', p .. 'session:' .. th) == 1 then return {'taken'} end
local dkey = p .. 'devices:' .. user
local rkey = p .. 'route:' .. user
local previous, expired, dropped = {}, {}, {}
local same, same_th = nil, nil
local online, offline = 0, {}
local flat = redis.call('HGETALL', dkey)
for i = 1, #flat, 2 do
  local dev, old_th = flat[i], flat[i + 1]
  local old = session_fields(old_th)
  if not old then
    redis.call('HDEL', dkey, dev)
  elseif tonumber(old.expires_at) <= now then
    finish(old_th, old, $EXPIRED, tombstone_ms)
    table.insert(expired, as_list(old))
  elseif dev == device then
    same, same_th = old, old_th
  elseif redis.call('HGET', rkey, 'd:' .. dev) == old.session_id then
    online = online + 1
  else
    table.insert(offline, {tonumber(old.created_at), old_th, old})
  end
end
if not same and policy == $REFUSE_NEW and online >= max_devices then return {'refused'} end
if same then
  finish(same_th, same, $AGAIN, tombstone_ms)
  previous = as_list(same)
end
-- At most max devices' sessions: those of devices offline give way first, oldest first.
table.sort(offline, function(a, b) return a[1] < b[1] end)
local excess = online + #offline + 1 - max_devices
for i = 1, math.min(excess, #offline) do
  finish(offline[i][2], offline[i][3], $ELSEWHERE, tombstone_ms)
  table.insert(dropped, as_list(offline[i][3]))
end
write_session(th, sid, user, device, node, ARGV[6], expires, pttl)
set_current(user, device, th, pttl)
return {'ok', previous, expired, dropped}
