-- Token buckets shared by every gateway (gateway/src/edge/ratelimit/shared.rs).
-- Atomic: all buckets are checked, then all are changed, or none.
--
-- KEYS[i]: one bucket (a hash: level, ts), refilled continuously at its
-- capacity per minute, by Redis's own clock (TIME), so the gateways' clocks
-- do not matter.
-- ARGV[3i-2]: capacity (units per minute)
-- ARGV[3i-1]: units to take (negative: give back; the level never exceeds
--             the capacity)
-- ARGV[3i]:   level the bucket must hold first (0: no check)
--
-- Returns {1, 0, "0"} when applied, or {0, i, seconds} when bucket i holds
-- less than it must: nothing changed, retry after that many seconds.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[3 * i - 2])
  local need = tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', key, 'level', 'ts')
  local level = tonumber(state[1]) or capacity
  local ts = tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - ts) * capacity / 60)
  if need > 0 and level < need then
    return {0, i, tostring((need - level) * 60 / capacity)}
  end
  levels[i] = level
end
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[3 * i - 2])
  local take = tonumber(ARGV[3 * i - 1])
  local level = math.min(capacity, levels[i] - take)
  redis.call('HSET', key, 'level', tostring(level), 'ts', tostring(now))
  -- A bucket idle for two minutes is full again: let it go.
  redis.call('EXPIRE', key, 120)
end
return {1, 0, "0"}
