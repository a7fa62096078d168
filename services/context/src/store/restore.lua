-- Replace a session's turns and metadata: how the archive puts back a session
-- lost from Redis. Idempotency keys are kept. Returns the turns now stored.
-- KEYS: 1 turns (list), 2 meta (hash), 3 idempotency keys (zset), 4 tenant index (zset)
-- ARGV: 1 now_ms, 2 created_ms, 3 ttl s, 4 session id, 5.. turns (JSON, oldest first)
redis.call('DEL', KEYS[1])
for i = 5, #ARGV do
  redis.call('RPUSH', KEYS[1], ARGV[i])
end
redis.call('HSET', KEYS[2], 'created_ms', ARGV[2], 'last_active_ms', ARGV[1], 'ttl_s', ARGV[3])
local ttl = tonumber(ARGV[3])
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
redis.call('ZADD', KEYS[4], 0, ARGV[4])
return redis.call('LLEN', KEYS[1])
