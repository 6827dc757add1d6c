-- Keep a live run's lock: extend it while the run still holds it.
-- KEYS: 1 run lock   ARGV: 1 run number, 2 lock ttl (ms)
-- Returns 1 when extended, 0 when the run no longer holds the lock.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
