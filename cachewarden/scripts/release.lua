#!lua flags=allow-oom
-- allow-oom: it drains the buffer, so it must run when Redis is full.
-- End a flush: release the lock, clear (or hold, for a backoff) the queued
-- marker, and reschedule the shard from its oldest remaining entry.
-- KEYS: 1 lock, 2 queued marker, 3 stream, 4 due zset
-- ARGV: 1 owner token, 2 max_delay_ms, 3 due member, 4 hold_ms (0: none)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
local marker = redis.call('GET', KEYS[2])
if marker == ARGV[1] or marker == 'queued' or not marker then
  if tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[2], 'backoff', 'PX', ARGV[4])
  else
    redis.call('DEL', KEYS[2])
  end
end
local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
if #first == 0 then
  redis.call('ZREM', KEYS[4], ARGV[3])
  return 0
end
local ms = tonumber(string.match(first[1][1], '^(%d+)'))
redis.call('ZADD', KEYS[4], ms + tonumber(ARGV[2]), ARGV[3])
return #first
