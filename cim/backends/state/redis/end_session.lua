-- ARGV: prefix, token_hash, now, reason, tombstone ttl (ms).
local th, now, reason = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local s = session_fields(th)
if not s then return false end
return end_session(th, s, now, reason, ARGV[5])
