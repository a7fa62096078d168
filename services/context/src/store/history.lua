-- Read every kept turn and slide the TTL. Nil when the session does not exist.
-- KEYS: 1 turns, 2 meta, 3 idempotency keys. ARGV: 1 now_ms
if redis.call('EXISTS', KEYS[2]) == 0 then
  return false
end
local ttl = tonumber(redis.call('HGET', KEYS[2], 'ttl_s'))
redis.call('HSET', KEYS[2], 'last_active_ms', ARGV[1])
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
return {tonumber(redis.call('HGET', KEYS[2], 'created_ms')), ttl, redis.call('LRANGE', KEYS[1], 0, -1)}
