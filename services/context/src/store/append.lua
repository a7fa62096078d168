-- Atomic append: idempotency check, RPUSH + LTRIM, metadata, TTL slide, tenant index.
-- KEYS: 1 turns (list), 2 meta (hash), 3 idempotency keys (zset), 4 tenant index (zset)
-- ARGV: 1 now_ms, 2 ttl override s (0 = keep), 3 default ttl s, 4 max turns,
--       5 idempotency key ('' = none), 6 session id, 7.. turns (JSON)
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl == 0 then
  ttl = tonumber(redis.call('HGET', KEYS[2], 'ttl_s') or ARGV[3])
end
local dup = 0
if ARGV[5] ~= '' then
  if redis.call('ZSCORE', KEYS[3], ARGV[5]) then
    dup = 1
  else
    redis.call('ZADD', KEYS[3], now, ARGV[5])
    redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -1001)
  end
end
if dup == 0 then
  for i = 7, #ARGV do
    redis.call('RPUSH', KEYS[1], ARGV[i])
  end
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[4]), -1)
end
redis.call('HSETNX', KEYS[2], 'created_ms', now)
redis.call('HSET', KEYS[2], 'last_active_ms', now, 'ttl_s', ttl)
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
redis.call('ZADD', KEYS[4], 0, ARGV[6])
return {dup, redis.call('LLEN', KEYS[1]), tonumber(redis.call('HGET', KEYS[2], 'created_ms')), ttl}
