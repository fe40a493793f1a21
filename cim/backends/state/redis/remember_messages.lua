-- ARGV: prefix, ttl (ms), then per message: key suffix, msg_id, sent_at_ms (the claims
-- one node made in one reactor turn). Claims in order, so a resend in the same batch
-- as its first copy finds that first copy. Returns only the messages known already,
-- flat: {index (1-based), msg_id, sent_at_ms, status, reason, ...}; every other one was
-- claimed now. The usual answer is empty: the node parses one line, not one a message.
local ttl = ARGV[2]
local known = {}
local index = 0
for i = 3, #ARGV, 3 do
  index = index + 1
  local key = p .. 'sent:' .. ARGV[i]
  local found = redis.call('HMGET', key, 'msg_id', 'sent_at_ms', 'status', 'reason')
  if found[1] then
    known[#known + 1] = tostring(index)
    for j = 1, 4 do known[#known + 1] = found[j] or '' end
  else
    redis.call('HSET', key, 'msg_id', ARGV[i + 1], 'sent_at_ms', ARGV[i + 2], 'status', '0',
      'reason', '')
    redis.call('PEXPIRE', key, ttl)
  end
end
return known
