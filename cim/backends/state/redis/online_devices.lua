-- ARGV: prefix, user... Returns, per user, its devices online (a flat list of field
-- names 'd:<device>'; empty when offline).
local out = {}
for i = 2, #ARGV do
  local fields = redis.call('HKEYS', p .. 'route:' .. ARGV[i])
  local devices = {}
  for _, field in ipairs(fields) do
    if string.sub(field, 1, 2) == 'd:' then table.insert(devices, string.sub(field, 3)) end
  end
  out[i - 1] = devices
end
return out
