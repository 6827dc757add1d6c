-- Set a cache entry and append the write to its shard's stream, atomically.
-- KEYS: 1 entry, 2 stream, 3 dirty hash, 4 due zset, 5 dead-letter keys hash, 6 lease
-- ARGV: 1 op ("w" write, "d" delete), 2 key, 3 value (JSON; "null" for a delete),
--       4 max_pending, 5 batch_size, 6 max_delay_ms, 7 due member,
--       8 version column name ("" for none), 9 version of this write ("" for none)
-- Returns the stream id, or an error "BACKPRESSURE <pending>" when the shard is full.
if redis.replicate_commands then redis.replicate_commands() end
local pending = redis.call('XLEN', KEYS[2])
if pending >= tonumber(ARGV[4]) then
  return redis.error_reply('BACKPRESSURE ' .. pending)
end
local keep_cache = false
if ARGV[8] ~= '' and ARGV[9] ~= '' then
  local current = redis.call('GET', KEYS[1])
  if current and current ~= 'null' then
    local ok, row = pcall(cjson.decode, current)
    if ok and type(row) == 'table' and tonumber(row[ARGV[8]]) and
       tonumber(row[ARGV[8]]) > tonumber(ARGV[9]) then
      keep_cache = true
    end
  end
end
if not keep_cache then
  -- No TTL while the write is pending: the entry cannot expire before the
  -- database holds it. The flusher sets the TTL once the write is committed.
  redis.call('SET', KEYS[1], ARGV[3])
end
local id
if ARGV[9] ~= '' then
  id = redis.call('XADD', KEYS[2], '*', 'o', ARGV[1], 'k', ARGV[2], 'v', ARGV[3], 'n', ARGV[9])
else
  id = redis.call('XADD', KEYS[2], '*', 'o', ARGV[1], 'k', ARGV[2], 'v', ARGV[3])
end
redis.call('HSET', KEYS[3], ARGV[2], id)
redis.call('HDEL', KEYS[5], ARGV[2])
-- A load or refresh of this key that began before now must not fill the cache.
redis.call('DEL', KEYS[6])
if pending + 1 >= tonumber(ARGV[5]) then
  redis.call('ZADD', KEYS[4], 0, ARGV[7])
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[4], 'NX', now + tonumber(ARGV[6]), ARGV[7])
end
return id
