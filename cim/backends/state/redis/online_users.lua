-- ARGV: prefix, offset, limit.
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local total = redis.call('ZCARD', p .. 'online')
if limit == 0 then return {total, {}} end
return {total, redis.call('ZRANGE', p .. 'online', offset, offset + limit - 1)}
