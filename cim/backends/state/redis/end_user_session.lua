-- ARGV: prefix, user, now, reason, tombstone ttl (ms), device ('' for every device),
-- keep ('' for none: every device but this one).
-- The user's sessions, whatever their tokens: an administrator's kick, an account gone,
-- a password changed. Returns one {'ended' or 'expired', session} per session ended.
local user, now, reason, device, keep = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[6], ARGV[7]
local dkey = p .. 'devices:' .. user
local out = {}
local flat = redis.call('HGETALL', dkey)
for i = 1, #flat, 2 do
  local dev, th = flat[i], flat[i + 1]
  if (device == '' or dev == device) and dev ~= keep then
    local s = session_fields(th)
    if s then
      table.insert(out, end_session(th, s, now, reason, ARGV[5]))
    else
      redis.call('HDEL', dkey, dev)
    end
  end
end
return out
