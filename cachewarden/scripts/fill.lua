-- Fill one entry from a load, only if the loader's lease is still valid: no write
-- or delete of the key happened since the load began (each deletes the lease), and
-- no write of it is pending.
-- A key read since its last load (hot) moves to the warm index: one grace reload
-- by the sweep even if it is not read again (see sweep_claim.lua).
-- KEYS: 1 entry, 2 lease, 3 dirty hash, 4 refresh marker, 5 hot index, 6 read stats,
--       7 warm index
-- ARGV: 1 key, 2 lease token, 3 value (JSON), 4 px, 5 how long the load took in ms
--       (''), 6 stale_ms
-- Only fills an absent entry: one that a write set meanwhile wins.
-- Returns {1, value} when filled, else {0, the entry as it is now (nil if absent)}.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return {0, redis.call('GET', KEYS[1])}
end
redis.call('DEL', KEYS[2])
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return {0, redis.call('GET', KEYS[1])}
end
local current = redis.call('GET', KEYS[1])
if current then return {0, current} end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
redis.call('DEL', KEYS[4])
if redis.call('ZREM', KEYS[5], ARGV[1]) == 1 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[7], now + tonumber(ARGV[4]) - tonumber(ARGV[6]), ARGV[1])
end
redis.call('HINCRBY', KEYS[6], 'loads', 1)
if ARGV[5] ~= '' then
  local old = tonumber(redis.call('HGET', KEYS[6], 'delay_ms'))
  local ms = tonumber(ARGV[5])
  if old then ms = old * 0.8 + ms * 0.2 end
  redis.call('HSET', KEYS[6], 'delay_ms', math.floor(ms + 0.5))
end
return {1, ARGV[3]}
