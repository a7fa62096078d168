-- Session metadata without sliding the TTL. Nil when the session does not exist.
-- KEYS: 1 turns, 2 meta
if redis.call('EXISTS', KEYS[2]) == 0 then
  return false
end
return {
  tonumber(redis.call('HGET', KEYS[2], 'created_ms')),
  tonumber(redis.call('HGET', KEYS[2], 'last_active_ms')),
  tonumber(redis.call('HGET', KEYS[2], 'ttl_s')),
  redis.call('LLEN', KEYS[1]),
  redis.call('PTTL', KEYS[2]),
}
