-- ARGV: prefix, user, now, reason, tombstone ttl (ms). The user's session, whatever
-- its token: an administrator's kick.
local user, now, reason = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local th = redis.call('GET', p .. 'user:' .. user)
if not th then return false end
local s = session_fields(th)
if not s then return false end
return end_session(th, s, now, reason, ARGV[5])
