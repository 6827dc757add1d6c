-- Keep a live run's lock: extend it while the run still holds it, never shortening it
-- (a planned run's lock lives until the run's deadline, see warm_end.lua).
-- KEYS: 1 run lock   ARGV: 1 run number, 2 lock ttl (ms)
-- Returns 1 when the run holds the lock, 0 when it no longer does.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return 1
end
return 0
