-- The members of the hot and warm indexes scored within the sweep window.
-- KEYS: 1 hot index, 2 warm index (see sweep_claim.lua)
-- ARGV: 1 window_ms, 2 the most members to return
-- Returns {horizon_ms, number of hot members H, H hot members, then warm members}:
-- hot first; warm ones only while fewer than the most were hot.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = now + tonumber(ARGV[1])
local most = tonumber(ARGV[2])
local hot = redis.call('ZRANGE', KEYS[1], '-inf', horizon, 'BYSCORE', 'LIMIT', 0, most)
local out = {horizon, #hot}
for _, key in ipairs(hot) do out[#out + 1] = key end
if #hot < most then
  local warm = redis.call('ZRANGE', KEYS[2], '-inf', horizon, 'BYSCORE', 'LIMIT', 0, most - #hot)
  for _, key in ipairs(warm) do out[#out + 1] = key end
end
return out
