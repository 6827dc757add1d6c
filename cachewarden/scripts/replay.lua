-- Re-enqueue one dead letter unless a newer write of its key superseded it.
-- KEYS: 1 entry, 2 stream, 3 dirty hash, 4 due zset, 5 dead-letter keys hash, 6 dead stream, 7 lease
-- ARGV: 1 op, 2 key, 3 value, 4 max_pending, 5 batch_size, 6 max_delay_ms, 7 due member,
--       8 dead-letter id, 9 force ("1" to replay even if superseded), 10 version ("" for none)
if ARGV[9] ~= '1' and redis.call('HGET', KEYS[5], ARGV[2]) ~= ARGV[8] then
  redis.call('XDEL', KEYS[6], ARGV[8])
  return 'superseded'
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[4]) then
  return redis.error_reply('BACKPRESSURE')
end
redis.call('SET', KEYS[1], ARGV[3])
local id
if ARGV[10] ~= '' then
  id = redis.call('XADD', KEYS[2], '*', 'o', ARGV[1], 'k', ARGV[2], 'v', ARGV[3], 'n', ARGV[10])
else
  id = redis.call('XADD', KEYS[2], '*', 'o', ARGV[1], 'k', ARGV[2], 'v', ARGV[3])
end
redis.call('HSET', KEYS[3], ARGV[2], id)
redis.call('HDEL', KEYS[5], ARGV[2])
redis.call('XDEL', KEYS[6], ARGV[8])
redis.call('DEL', KEYS[7])
redis.call('ZADD', KEYS[4], 0, ARGV[7])
return id
