-- Claim the candidates of a sweep (see sweep_candidates.lua) whose entries expire
-- by the horizon.
-- KEYS: 1 hot index (keys read since their last load), 2 warm index (keys reloaded
--       by a refresh and not read since: one grace reload each); both score a key
--       with its entry's expiry less the stale grace (ms); then 2 per candidate:
--       its entry, its refresh marker
-- ARGV: 1 horizon_ms, 2 stale_ms, 3 marker px, 4 ttl_ms, 5 how many candidates come
--       from the hot index (the first ones), then the candidate keys
-- A candidate no longer in its index is skipped. One whose entry has no TTL leaves
-- the index (a write is pending: its next read adds it again). One whose entry was
-- reloaded or written since it was scored moves to its new expiry. A due key gets a
-- refresh marker holding the claim time and leaves its index (a hot one moves to the
-- warm index, scored with the expiry its reload will give it). A key whose entry is
-- gone, or whose marker is set already (a refresh of it is queued or running), leaves
-- the hot index (a read adds it back) and, when cold, the warm one; a warm key with
-- its refresh in flight stays just past the horizon, so that its one grace reload is
-- claimed once that refresh has landed.
-- An entry's expiry is read as an absolute time (PEXPIRETIME), never as the TIME at the
-- start plus a PTTL: Redis 7.0's clock runs on while a script does, so a long claim
-- would see the entries it reaches last expire early, and claim keys that are not due
-- (which lease_many.lua, judging the same expiry exactly, would then skip, leaving
-- their markers to block every refresh until the entries had expired).
-- Returns the claimed keys.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon, stale = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl, hot_count = tonumber(ARGV[4]), tonumber(ARGV[5])
local claimed = {}
for i = 6, #ARGV do
  local j = i - 5
  local key = ARGV[i]
  local hot = j <= hot_count
  local index = hot and KEYS[1] or KEYS[2]
  local entry, marker = KEYS[1 + 2 * j], KEYS[2 + 2 * j]
  if redis.call('ZSCORE', index, key) then
    local at = redis.call('PEXPIRETIME', entry)
    if at == -1 then
      redis.call('ZREM', index, key)  -- a write is pending: its next read adds it again
    elseif at >= 0 and at - stale > horizon then
      redis.call('ZADD', index, at - stale, key)
    elseif at >= 0 and redis.call('SET', marker, now, 'NX', 'PX', ARGV[3]) then
      redis.call('ZREM', index, key)
      if hot then redis.call('ZADD', KEYS[2], now + ttl, key) end
      claimed[#claimed + 1] = key
    elseif hot or redis.call('EXISTS', marker) == 0 then
      -- Gone and cold; or hot with its refresh queued: its next read adds it again.
      redis.call('ZREM', index, key)
    else
      -- Warm with a refresh in flight: its grace reload comes after; look again later.
      redis.call('ZADD', index, horizon + 1, key)
    end
  end
end
return claimed
