-- ARGV: prefix, then per outcome: key suffix, status, reason (the outcomes one node
-- recorded in one reactor turn, applied in order). Returns one 1 or 0 per outcome
-- (recorded, or not: no such message, or a stale failure).
local replies = {}
for i = 2, #ARGV, 3 do
  local key = p .. 'sent:' .. ARGV[i]
  local current = redis.call('HGET', key, 'status')
  local status = ARGV[i + 1]
  -- A stale failure (say from a restarted node draining its queue) never undoes a success.
  if not current or (status == '3' and (current == '1' or current == '2' or current == '4')) then
    replies[#replies + 1] = 0
  else
    redis.call('HSET', key, 'status', status, 'reason', ARGV[i + 2])
    replies[#replies + 1] = 1
  end
end
return replies
