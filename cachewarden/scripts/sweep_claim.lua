-- Claim the hot keys whose entries expire within the sweep window.
-- KEYS: 1 hot index (keys read since their last load), 2 warm index (keys reloaded
--       by a refresh and not read since: one grace reload each); both score a key
--       with its entry's expiry less the stale grace (ms)
-- ARGV: 1 entry prefix, 2 refresh-marker prefix, 3 window_ms, 4 stale_ms,
--       5 marker px, 6 the most keys to claim, 7 ttl_ms
-- A member whose entry is gone or has no TTL leaves the index (cold, or a write is
-- pending: its next read adds it again). One whose entry was reloaded or written
-- since it was scored moves to its new expiry. A due key leaves its index (a hot one
-- moves to the warm index, scored with the expiry its reload will give it) and gets
-- a refresh marker, unless one is set already (a refresh of it is queued).
-- Returns {horizon_ms, more, claimed key, ...}: more is 1 when due members may be
-- left (the claim or scan limit was reached), else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = now + tonumber(ARGV[3])
local stale, most, ttl = tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7])
local out = {horizon, 1}
local scanned = 0

local function claim(index, hot)
  while #out - 2 < most and scanned < most * 4 do
    local members = redis.call('ZRANGE', index, '-inf', horizon, 'BYSCORE', 'LIMIT', 0,
                               most - (#out - 2))
    if #members == 0 then return true end
    for _, key in ipairs(members) do
      local pttl = redis.call('PTTL', ARGV[1] .. key)
      if pttl < 0 then
        redis.call('ZREM', index, key)
      elseif now + pttl - stale > horizon then
        redis.call('ZADD', index, now + pttl - stale, key)
      else
        redis.call('ZREM', index, key)
        if hot then redis.call('ZADD', KEYS[2], now + ttl, key) end
        if redis.call('SET', ARGV[2] .. key, '1', 'NX', 'PX', ARGV[5]) then
          out[#out + 1] = key
        end
      end
    end
    scanned = scanned + #members
  end
  return false
end

if claim(KEYS[1], true) and claim(KEYS[2], false) then out[2] = 0 end
return out
