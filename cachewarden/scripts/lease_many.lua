-- Take the leases of the keys a refresh reloads, skipping those that need none.
-- KEYS: groups of 3 per key: entry, lease, dirty hash
-- ARGV: 1 lease token, 2 lock_timeout_ms, 3 horizon_ms: reload only entries whose
--       expiry (less the stale grace) is at or before it ('' for any), 4 stale_ms,
--       5.. the keys
-- Skips a key with a pending write (its entry has no TTL, or its dirty field is set),
-- one reloaded past the horizon already, and one whose lease another loader holds.
-- Returns the 1-based positions of the keys leased.
-- The expiry is the absolute PEXPIRETIME, the same figure sweep_claim.lua judged.
local horizon, stale = tonumber(ARGV[3]), tonumber(ARGV[4])
local leased = {}
for i = 5, #ARGV do
  local g = (i - 5) * 3
  local at = redis.call('PEXPIRETIME', KEYS[g + 1])
  local skip = at == -1 or (horizon ~= nil and at >= 0 and at - stale > horizon)
  if not skip and redis.call('HEXISTS', KEYS[g + 3], ARGV[i]) == 0 then
    if redis.call('SET', KEYS[g + 2], ARGV[1], 'NX', 'PX', ARGV[2]) then
      leased[#leased + 1] = i - 4
    end
  end
end
return leased
