#!lua flags=allow-oom
-- allow-oom: it drains the buffer, so it must run when Redis is full.
-- Extend a lock (and the shard's queued marker) if we still own it.
-- KEYS: 1 lock, 2 queued marker   ARGV: 1 owner token, 2 ttl_ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
