-- Read one cache entry (a hit), or decide who loads it (a miss): one round trip.
-- A hit due for an early refresh records the request here, for a worker to send.
-- KEYS: 1 entry, 2 hot index, 3 refresh marker, 4 lease, 5 dirty hash, 6 read stats,
--       7 refresh requests (sorted set: key -> the horizon of its reload)
-- ARGV: 1 key, 2 stale_ms, 3 lease token, 4 lock_timeout_ms, 5 track hot keys ("1"/"0"),
--       6 ask for a refresh when at most this many ms are left (a row),
--       7 the same for a known-absent entry, 8 return the entity's refresh delay ("1"/"0"),
--       9, 10 hits and misses the caller counted since it last passed them on (added to
--       the read counters here, so counting costs no round trip of its own)
-- A hit returns {value, pttl, asked, now_ms, delay_ms}: asked is 1 when this read
-- recorded a refresh request (none was queued for the key yet); delay_ms is nil
-- unless asked for (or unknown).
-- A miss returns {nil, -2, state, now_ms, error}: state 1 = this caller took the lease
-- and loads; 0 = another loader holds the lease; 2 = a write of the key is pending;
-- 3 = the last load failed moments ago (error: its message).
if ARGV[9] and ARGV[9] ~= '0' then redis.call('HINCRBY', KEYS[6], 'hits', ARGV[9]) end
if ARGV[10] and ARGV[10] ~= '0' then redis.call('HINCRBY', KEYS[6], 'misses', ARGV[10]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local value = redis.call('GET', KEYS[1])
if value then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl < 0 then return {value, pttl, 0, now} end
  local remaining = pttl - tonumber(ARGV[2])
  if ARGV[5] == '1' then
    -- The hot-key index: a ZSCORE per read, a ZADD on the first read after a load.
    local expiry = now + remaining
    local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
    if not score or math.abs(tonumber(score) - expiry) > 50 then
      redis.call('ZADD', KEYS[2], expiry, ARGV[1])
    end
  end
  local asked = 0
  local below = tonumber(value == 'null' and ARGV[7] or ARGV[6])
  if remaining <= below and redis.call('SET', KEYS[3], now, 'NX', 'PX', ARGV[4]) then
    -- The horizon: a reload that finds the entry expiring later (reloaded since) skips it.
    redis.call('ZADD', KEYS[7], now + remaining + 5, ARGV[1])
    asked = 1
  end
  local delay = false
  if ARGV[8] == '1' then delay = redis.call('HGET', KEYS[6], 'delay_ms') end
  return {value, pttl, asked, now, delay}
end
local lease = redis.call('GET', KEYS[4])
if lease then
  if string.sub(lease, 1, 1) == '!' then
    return {false, -2, 3, now, string.sub(lease, 2)}
  end
  redis.call('HINCRBY', KEYS[6], 'waits', 1)  -- a stampede wait (per process and key)
  return {false, -2, 0, now}
end
if redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then return {false, -2, 2, now} end
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
return {false, -2, 1, now}
