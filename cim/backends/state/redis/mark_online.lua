-- ARGV: prefix, user, session_id, node, route ttl (ms).
local user, sid, node = ARGV[2], ARGV[3], ARGV[4]
local th = redis.call('GET', p .. 'user:' .. user)
if not th or redis.call('HGET', p .. 'session:' .. th, 'session_id') ~= sid then
  return 0
end
set_online(user, sid, node, ARGV[5], now_ms())
return 1
