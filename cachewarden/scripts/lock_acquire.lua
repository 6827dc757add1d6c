#!lua flags=allow-oom
-- allow-oom: it drains the buffer, so it must run when Redis is full.
-- Take a lock and a fresh fencing token.
-- KEYS: 1 lock, 2 fence counter   ARGV: 1 owner token, 2 ttl_ms
-- Returns the fencing token, or 0 when another owner holds the lock.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
