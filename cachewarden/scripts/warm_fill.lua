-- Fill a chunk's entries, skipping every key that a write made newer than the chunk's
-- read: one with a write pending (its entry has no TTL, or its dirty field is set), or
-- one that a flush settled since the chunk began (touched at or after its begin).
-- Counts the chunk once, however often it is filled (a redelivered chunk task).
-- The dirty hashes are those of the caller's shard count S, which must be the count
-- Redis records (N of a reshard "N>M" draining): else nothing is written and the record
-- is returned, for the caller to fill again with the hashes of that count.
-- KEYS: 1 run hash, 2 chunks hash, 3 warming marker, 4 touched keys zset, 5 recorded
--       shard count, then the dirty hash of each of the S shards, then the entry of
--       each row
-- ARGV: 1 run number, 2 the chunk's begin time (ms), 3 the marking horizon (ms),
--       4 S, 5 chunk index, 6 rows that could not be encoded, then 4 per row:
--       key, value (JSON), px, shard (1-based, of S)
-- Returns {filled, skipped, chunks done}, or {-1} when the run is no longer current
-- (nothing written), or {-2} when the marking lapsed since the chunk began (the
-- chunk must be read again; nothing written), or {-3, record} when S is not the
-- recorded count (nothing written).
local run_hash = KEYS[1]
if redis.call('HGET', run_hash, 'run') ~= ARGV[1] or
   redis.call('HGET', run_hash, 'state') ~= 'running' then
  return {-1}
end
local begun, horizon = tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = tonumber(redis.call('GET', KEYS[3]))
if not since or since > begun or now - begun > horizon then return {-2} end
local shards = tonumber(ARGV[4])
local record = redis.call('GET', KEYS[5])
if record and tonumber(string.match(record, '^(%d+)')) ~= shards then
  return {-3, record}
end
local busy = {}
for s = 1, shards do busy[s] = redis.call('HLEN', KEYS[5 + s]) > 0 end
local touched = redis.call('EXISTS', KEYS[4]) == 1
local entries = 5 + shards
local filled, skipped, row = 0, 0, 0
for i = 7, #ARGV, 4 do
  row = row + 1
  local key, shard, entry = ARGV[i], tonumber(ARGV[i + 3]), KEYS[entries + row]
  -- No TTL: a write is pending (enqueue.lua sets the entry without one, and the flush
  -- gives it one once the database holds it), whichever shard count it was sent with.
  local skip = redis.call('PEXPIRETIME', entry) == -1
  if not skip then skip = busy[shard] and redis.call('HEXISTS', KEYS[5 + shard], key) == 1 end
  if not skip and touched then
    local at = redis.call('ZSCORE', KEYS[4], key)
    skip = at ~= false and tonumber(at) >= begun
  end
  if skip then
    skipped = skipped + 1
  else
    redis.call('SET', entry, ARGV[i + 1], 'PX', ARGV[i + 2])
    filled = filled + 1
  end
end
if redis.call('HSETNX', KEYS[2], ARGV[5], row) == 1 then
  redis.call('HINCRBY', run_hash, 'rows', row + tonumber(ARGV[6]))
  redis.call('HINCRBY', run_hash, 'filled', filled)
  redis.call('HINCRBY', run_hash, 'skipped', skipped)
  redis.call('HINCRBY', run_hash, 'invalid', tonumber(ARGV[6]))
  redis.call('HINCRBY', run_hash, 'chunks_done', 1)
end
return {filled, skipped, tonumber(redis.call('HGET', run_hash, 'chunks_done'))}
