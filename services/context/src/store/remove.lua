-- Reset (ARGV[1] = 'reset': drop the turns, keep the session) or delete
-- (ARGV[1] = 'delete': drop everything). Returns the turns removed, or -1
-- when the session does not exist.
-- KEYS: 1 turns, 2 meta, 3 idempotency keys, 4 tenant index. ARGV: 1 mode, 2 session id, 3 now_ms
if redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
local n = redis.call('LLEN', KEYS[1])
redis.call('DEL', KEYS[1])
if ARGV[1] == 'delete' then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[2])
else
  local ttl = tonumber(redis.call('HGET', KEYS[2], 'ttl_s'))
  redis.call('HSET', KEYS[2], 'last_active_ms', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return n
