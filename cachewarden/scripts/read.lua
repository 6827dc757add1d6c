-- Read one cache entry (a hit), or decide who loads it (a miss): one round trip.
-- KEYS: 1 entry, 2 hot index, 3 refresh marker, 4 lease, 5 dirty hash, 6 read stats
-- ARGV: 1 key, 2 stale_ms, 3 lease token, 4 lock_timeout_ms, 5 track hot keys ("1"/"0"),
--       6 return the entity's refresh delay ("1"/"0")
-- A hit returns {value, pttl, queued, now_ms, delay_ms}: queued is 1 when a refresh
-- of the key is queued already; delay_ms is nil unless asked for (or unknown).
-- A miss returns {nil, -2, state, now_ms, error}: state 1 = this caller took the lease
-- and loads; 0 = another loader holds the lease; 2 = a write of the key is pending;
-- 3 = the last load failed moments ago (error: its message).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local value = redis.call('GET', KEYS[1])
if value then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl < 0 then return {value, pttl, 0, now} end
  if ARGV[5] == '1' then
    -- The hot-key index: a ZSCORE per read, a ZADD on the first read after a load.
    local expiry = now + pttl - tonumber(ARGV[2])
    local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
    if not score or math.abs(tonumber(score) - expiry) > 50 then
      redis.call('ZADD', KEYS[2], expiry, ARGV[1])
    end
  end
  local delay = false
  if ARGV[6] == '1' then delay = redis.call('HGET', KEYS[6], 'delay_ms') end
  return {value, pttl, redis.call('EXISTS', KEYS[3]), now, delay}
end
local lease = redis.call('GET', KEYS[4])
if lease then
  if string.sub(lease, 1, 1) == '!' then
    return {false, -2, 3, now, string.sub(lease, 2)}
  end
  return {false, -2, 0, now}
end
if redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then return {false, -2, 2, now} end
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
return {false, -2, 1, now}
