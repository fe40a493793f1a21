-- ARGV: prefix, token_hash, now, tombstone ttl (ms), ticket id, ticket expiry (ms).
-- The session's live record when the ticket id was never redeemed; false when it was,
-- when the ticket expired, or when the session is gone (a ticket dies with its token).
local th, now = ARGV[2], tonumber(ARGV[3])
local s = session_fields(th)
if not s then return false end
if tonumber(s.expires_at) <= now then
  finish(th, s, $EXPIRED, ARGV[4])
  return {'expired', as_list(s)}
end
local ttl = tonumber(ARGV[6]) - math.floor(now * 1000)
if ttl <= 0 then return false end
if not redis.call('SET', p .. 'ticket:' .. ARGV[5], '1', 'NX', 'PX', int(ttl)) then
  return false
end
return {'ok', as_list(s)}
