-- ARGV: prefix, node id, highest number. A node keeps its number across restarts;
-- numbers are never handed out twice, so message ids of two nodes never collide.
local known = redis.call('HGET', p .. 'node-numbers', ARGV[2])
if known then return known end
local number = redis.call('INCR', p .. 'node-number-seq')
if number > tonumber(ARGV[3]) then
  return redis.error_reply('no node numbers left: ' .. ARGV[3] .. ' node ids were used')
end
redis.call('HSET', p .. 'node-numbers', ARGV[2], number)
return number
