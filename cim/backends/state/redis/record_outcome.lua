-- ARGV: prefix, key suffix, status, reason.
local key = p .. 'sent:' .. ARGV[2]
local current = redis.call('HGET', key, 'status')
if not current then return 0 end
-- A stale failure (say from a restarted node draining its queue) never undoes a success.
if ARGV[3] == '3' and (current == '1' or current == '2' or current == '4') then return 0 end
redis.call('HSET', key, 'status', ARGV[3], 'reason', ARGV[4])
return 1
