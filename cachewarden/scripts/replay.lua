-- Re-enqueue one dead letter, with every check enqueue.lua makes, unless a newer write
-- of its key superseded it. The operation goes in as enqueue.lua would take it (its
-- cache entry, stream entry, dirty field, tombstone), and the letter goes in the same
-- call, so a letter is never both replayed and kept, nor dropped and not replayed.
-- KEYS: 1 due zset, 2 dead-letter keys hash, 3 dead-letter stream, 4 recorded shard
--       count, 5 memory mark, 6 the entity's tombstones marker, then the operation's
--       7 entry, 8 stream, 9 dirty hash, 10 lease, 11 tombstone (as enqueue.lua's)
-- ARGV: 1 max_pending, 2 batch_size, 3 max_delay_ms, 4 version column name ("" for none),
--       5 tombstone_ttl_ms, 6 max_dead_letters, 7 the replayer's shard count, 8 the memory
--       headroom, then the operation's 9 op, 10 key, 11 value, 12 version ("" for none),
--       13 due member, then 14 the dead-letter id, 15 force ("1": replay even if
--       superseded by a newer write). 1-8 are enqueue.lua's (2 and 3 unused: a
--       replayed shard is due at once).
-- Returns the new stream id; "superseded" (the letter is dropped) when a newer write of
-- its key came after it (unless forced) or a delete at its version or higher outranks
-- it (forced or not: the database must not take it back); "!GONE" when the letter is
-- no longer held (replayed or discarded already). Refusals, nothing changed, as
-- enqueue.lua's: "!MEMORY <used> <max>", "!SHARDS <record>" (the replayer's count is
-- not the record, or a reshard runs), "!DEADLETTERS <n>" (the entity would still hold
-- max_dead_letters without this one), "!BACKPRESSURE <pending>".
if redis.replicate_commands then redis.replicate_commands() end
local key, version, letter = ARGV[10], ARGV[12], ARGV[14]
local column = ARGV[4]
if #redis.call('XRANGE', KEYS[3], letter, letter) == 0 then return '!GONE' end
local function drop()
  if redis.call('HGET', KEYS[2], key) == letter then redis.call('HDEL', KEYS[2], key) end
  redis.call('XDEL', KEYS[3], letter)
  return 'superseded'
end
if ARGV[15] ~= '1' and redis.call('HGET', KEYS[2], key) ~= letter then return drop() end
-- Memory, as enqueue.lua looks at it (the same mark).
local memory = redis.call('GET', KEYS[5])
if not memory or (memory == 'ok' and #ARGV[11] > 65536) then
  local info = redis.call('INFO', 'memory')
  local used = tonumber(string.match(info, 'used_memory:(%d+)'))
  local max = tonumber(string.match(info, 'maxmemory:(%d+)'))
  if max and max > 0 and used >= max * (1 - tonumber(ARGV[8])) then
    memory = used .. ' ' .. max
    redis.call('SET', KEYS[5], memory, 'PX', 1000)
  else
    memory = 'ok'
    redis.call('SET', KEYS[5], memory, 'PX', 100)
  end
end
if memory ~= 'ok' then return '!MEMORY ' .. memory end
local recorded = redis.call('GET', KEYS[4])
if not recorded then
  redis.call('SET', KEYS[4], ARGV[7])
elseif recorded ~= ARGV[7] then
  return '!SHARDS ' .. recorded
end
-- The letter leaves as the operation comes in: what the entity holds after the replay.
local dead = redis.call('XLEN', KEYS[3]) - 1
if dead >= tonumber(ARGV[6]) then return '!DEADLETTERS ' .. dead end
if column ~= '' and version ~= '' and redis.call('EXISTS', KEYS[6]) == 1 then
  local at = redis.call('GET', KEYS[11])
  if at and tonumber(at) >= tonumber(version) then return drop() end
end
local pending = redis.call('XLEN', KEYS[8])
if pending >= tonumber(ARGV[1]) then return '!BACKPRESSURE ' .. pending end
local op, value = ARGV[9], ARGV[11]
local keep_cache = false
if column ~= '' and version ~= '' then
  local current = redis.call('GET', KEYS[7])
  if current and current ~= 'null' then
    local ok, row = pcall(cjson.decode, current)
    if ok and type(row) == 'table' and tonumber(row[column]) and
       tonumber(row[column]) > tonumber(version) then
      keep_cache = true
    end
  end
end
-- No TTL while the write is pending, as enqueue.lua sets it. A partial write ("p")
-- drops the entry instead: a read waits for the flush and loads the whole row.
if not keep_cache then
  if op == 'p' then redis.call('DEL', KEYS[7]) else redis.call('SET', KEYS[7], value) end
end
local id
if version ~= '' then
  id = redis.call('XADD', KEYS[8], '*', 'o', op, 'k', key, 'v', value, 'n', version)
else
  id = redis.call('XADD', KEYS[8], '*', 'o', op, 'k', key, 'v', value)
end
redis.call('HSET', KEYS[9], key, id)
if op == 'd' and version ~= '' and column ~= '' then
  redis.call('SET', KEYS[11], version, 'PX', ARGV[5])
  redis.call('SET', KEYS[6], '1', 'PX', ARGV[5])
end
redis.call('HDEL', KEYS[2], key)
redis.call('XDEL', KEYS[3], letter)
-- A load or refresh of this key that began before now must not fill the cache.
redis.call('DEL', KEYS[10])
-- Due now: a replay is an operator's act, and rare.
redis.call('ZADD', KEYS[1], 0, ARGV[13])
return id
