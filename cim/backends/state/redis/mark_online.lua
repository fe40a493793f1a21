-- ARGV: prefix, user, session_id, node, route ttl (ms), device.
local user, sid, node, device = ARGV[2], ARGV[3], ARGV[4], ARGV[6]
local th = redis.call('HGET', p .. 'devices:' .. user, device)
if not th or redis.call('HGET', p .. 'session:' .. th, 'session_id') ~= sid then
  return 0
end
set_online(user, sid, device, node, ARGV[5], now_ms())
return 1
