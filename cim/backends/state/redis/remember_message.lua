-- ARGV: prefix, key suffix, msg_id, sent_at_ms, ttl (ms). Returns nil the first time,
-- else {msg_id, sent_at_ms, status, reason}.
local key = p .. 'sent:' .. ARGV[2]
local known = redis.call('HMGET', key, 'msg_id', 'sent_at_ms', 'status', 'reason')
if known[1] then return known end
redis.call('HSET', key, 'msg_id', ARGV[3], 'sent_at_ms', ARGV[4], 'status', '0', 'reason', '')
redis.call('PEXPIRE', key, ARGV[5])
return nil
