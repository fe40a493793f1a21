-- ARGV: prefix, user... Returns each user's node, or false when offline.
local nodes = {}
for i = 2, #ARGV do
  nodes[i - 1] = redis.call('HGET', p .. 'route:' .. ARGV[i], 'node')
end
return nodes
