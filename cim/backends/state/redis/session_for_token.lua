-- ARGV: prefix, token_hash, now, tombstone ttl (ms).
local th, now = ARGV[2], tonumber(ARGV[3])
local s = session_fields(th)
if not s then return false end
if tonumber(s.expires_at) <= now then
  finish(th, s, $EXPIRED, ARGV[4])
  return {'expired', as_list(s)}
end
return {'ok', as_list(s)}
