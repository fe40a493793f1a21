-- ARGV: prefix. Returns node, count, node, count, ...
local clock = int(now_ms())
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local n = redis.call('ZCOUNT', p .. 'online:' .. node, '(' .. clock, '+inf')
  if n > 0 then
    table.insert(out, node)
    table.insert(out, n)
  end
end
return out
