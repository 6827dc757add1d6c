-- Fill the entries of a batch reload: each only where its lease is still ours (no
-- write or delete since the load began) and no write of it is pending.
-- A key read since its last load (hot) moves to the warm index: one grace reload
-- by the sweep even if it is not read again (see sweep_claim.lua).
-- KEYS: 1 hot index, 2 read stats, 3 warm index, then groups of 4 per key: entry,
--       lease, dirty hash, refresh marker (its value: when the refresh was asked for)
-- ARGV: 1 lease token, 2 px of a row, 3 px of a known-absent entry ("null"),
--       4 stale_ms, then pairs: key, value
-- Returns how many entries were filled. The mean time from request to fill feeds
-- the entity's refresh delay (delay_ms, a moving average XFetch reads).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local filled, waited, timed = 0, 0, 0
for i = 5, #ARGV, 2 do
  local g = 3 + (i - 5) * 2
  local key, value = ARGV[i], ARGV[i + 1]
  if redis.call('GET', KEYS[g + 2]) == ARGV[1] then
    redis.call('DEL', KEYS[g + 2])
    if redis.call('HEXISTS', KEYS[g + 3], key) == 0 then
      local px = ARGV[2]
      if value == 'null' then px = ARGV[3] end
      redis.call('SET', KEYS[g + 1], value, 'PX', px)
      local asked = tonumber(redis.call('GET', KEYS[g + 4]))
      if asked then waited = waited + math.max(now - asked, 0); timed = timed + 1 end
      redis.call('DEL', KEYS[g + 4])
      if redis.call('ZREM', KEYS[1], key) == 1 then
        redis.call('ZADD', KEYS[3], now + tonumber(px) - tonumber(ARGV[4]), key)
      end
      filled = filled + 1
    end
  end
end
if filled > 0 then
  redis.call('HINCRBY', KEYS[2], 'refreshed', filled)
end
if timed > 0 then
  local ms = waited / timed
  local old = tonumber(redis.call('HGET', KEYS[2], 'delay_ms'))
  if old then ms = old * 0.8 + ms * 0.2 end
  redis.call('HSET', KEYS[2], 'delay_ms', math.floor(ms + 0.5))
end
return filled
