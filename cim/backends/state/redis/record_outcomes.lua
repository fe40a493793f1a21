-- ARGV: prefix, then per outcome: key suffix, status, reason (the outcomes one node
-- recorded in one reactor turn, applied in order). Returns how many were recorded (the
-- others name no message, or are stale failures); one integer, whatever the batch.
local recorded = 0
for i = 2, #ARGV, 3 do
  local key = p .. 'sent:' .. ARGV[i]
  local current = redis.call('HGET', key, 'status')
  local status = ARGV[i + 1]
  -- A stale failure (say from a restarted node draining its queue) never undoes a success.
  if current and not (status == '3' and (current == '1' or current == '2' or current == '4')) then
    redis.call('HSET', key, 'status', status, 'reason', ARGV[i + 2])
    recorded = recorded + 1
  end
end
return recorded
