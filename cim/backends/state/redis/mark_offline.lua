-- ARGV: prefix, user, session_id, node, device.
local user, sid, node, device = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if set_offline(user, sid, device) == 1 then return 1 end
local holder = redis.call('HGET', p .. 'route:' .. user, 'node')
if not holder then
  drop_online(user, node)
  redis.call('ZREM', p .. 'online', user)
elseif holder ~= node then
  drop_online(user, node)
end
return 0
