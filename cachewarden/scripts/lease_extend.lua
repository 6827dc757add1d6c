-- Extend the leases a loader still holds while its load runs, so that a load longer
-- than lock_timeout keeps one loader per key. A lease a write or delete voided, or one
-- that turned into a failure marker or lapsed, is not ours any more and is left alone
-- (PEXPIRE never brings a key back).
-- KEYS: the leases
-- ARGV: 1 lease token, 2 lock_timeout_ms
-- Returns how many leases were extended (0: none is ours any more).
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    n = n + 1
  end
end
return n
