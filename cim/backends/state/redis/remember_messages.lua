-- ARGV: prefix, ttl (ms), then per message: key suffix, msg_id, sent_at_ms (the claims
-- one node made in one reactor turn). Returns one reply per message, in order: nil the
-- first time, else {msg_id, sent_at_ms, status, reason}. In order, so a resend in the
-- same batch as its first copy finds that first copy.
local ttl = ARGV[2]
local replies = {}
for i = 3, #ARGV, 3 do
  local key = p .. 'sent:' .. ARGV[i]
  local known = redis.call('HMGET', key, 'msg_id', 'sent_at_ms', 'status', 'reason')
  if known[1] then
    replies[#replies + 1] = known
  else
    redis.call('HSET', key, 'msg_id', ARGV[i + 1], 'sent_at_ms', ARGV[i + 2], 'status', '0',
      'reason', '')
    redis.call('PEXPIRE', key, ttl)
    replies[#replies + 1] = false
  end
end
return replies
