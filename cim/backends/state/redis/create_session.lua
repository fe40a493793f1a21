-- ARGV: prefix, token_hash, user, device, node, now, expires_at, policy, session_id,
-- session pttl (ms), tombstone ttl (ms).
local th, user, device, node = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now, expires, policy, sid = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
local pttl, tombstone_ms = ARGV[10], ARGV[11]
if redis.call('EXISTS', p .. 'session:' .. th) == 1 then return {'taken'} end
local previous, expired = {}, {}
local old_th = redis.call('GET', p .. 'user:' .. user)
if old_th then
  local old = session_fields(old_th)
  if old then
    if tonumber(old.expires_at) <= now then
      finish(old_th, old, $EXPIRED, tombstone_ms)
      expired = as_list(old)
    elseif policy == $REFUSE_NEW
        and redis.call('HGET', p .. 'route:' .. user, 'sid') == old.session_id then
      return {'refused'}
    else
      finish(old_th, old, $ELSEWHERE, tombstone_ms)
      previous = as_list(old)
    end
  end
end
write_session(th, sid, user, device, node, ARGV[6], expires, pttl)
redis.call('SET', p .. 'user:' .. user, th, 'PX', pttl)
return {'ok', previous, expired}
