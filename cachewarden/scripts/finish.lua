#!lua flags=allow-oom
-- allow-oom: it drains the buffer, so it must run when Redis is full.
-- After a committed flush: delete the batch's entries from the stream, dead-letter the
-- operations the database refused, and give each flushed key its TTL back (or drop its
-- entry), all at once: a crash leaves either the whole batch in the stream (read and
-- applied again by the next lock holder) or none of it.
-- Only the shard's lock holder settles: a flusher that lost its lock (paused past it)
-- changes nothing here, and the batch it may have committed stays in the stream for the
-- holder, who applies it again (an idempotent upsert) and settles it.
-- Each key settles only while the operation the flush applied is still its newest
-- pending one; a key written again meanwhile is left to that newer write.
-- While a warm run of the entity is reading (its marker is set), each settled key is
-- recorded as touched now: a chunk read before this flush must not fill it.
-- KEYS: 1 stream, 2 dirty hash, 3 dead-letter stream, 4 dead-letter keys hash,
--       5 warming marker, 6 touched keys zset, 7 flush lock, 8 queued marker, then the
--       entry of each written key, then the entry of each other key (both in the order
--       of their keys in ARGV)
-- op: "d" deleted; "s:<version>:<column>" outranked: the database kept a newer version;
--     "x" the key's operations were refused (or what was applied in their place was a
--     delete or was outranked): drop the entry; "v" a write applied in place of a newer
--     one the database refused: the entry gets its value (in the values region).
--     For "x" and "v", while a newer write of the key is pending and the entry holds a
--     value the database refused, the entry gets that pending write's value instead
--     (or goes, where that write is partial: "p").
-- ARGV: 1 the oldest entry this flush leaves in the stream ("" for none: a row lock
--       held its key), 2 ttl_ms, 3 shard, 4 now_ms, 5 the id of the batch's last entry
--       to delete ("" for none), 6 lock owner ("": not checked), 7 lock ttl_ms, 8 E,
--       9 W, 10 M, 11 L, then the E + W + M ids: E more ids to delete one by one (only
--       with ARGV[1]: entries past a kept one cannot go by trimming), then the id of
--       each written key's newest entry, then each other key's; then the W + M keys
--       (written, other); then the M ops; then one value per "v" op, in order; then
--       L letters, each: key, o, v, n (version, ""), error, stream_id.
-- Returns {keys settled, dead letters added, 1 if the lock was extended (0: the owner
-- no longer holds it, and nothing was done; -1: not asked), dead letters the entity
-- holds}.
local extended = -1
if ARGV[6] ~= '' then
  if redis.call('GET', KEYS[7]) ~= ARGV[6] then
    return {0, 0, 0, redis.call('XLEN', KEYS[3])}
  end
  redis.call('PEXPIRE', KEYS[7], ARGV[7])
  redis.call('SET', KEYS[8], ARGV[6], 'PX', ARGV[7])
  extended = 1
end
local warming = redis.call('EXISTS', KEYS[5]) == 1
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- The TTL given back, as an absolute time: PEXPIREAT is what Redis would rewrite a
-- PEXPIRE into, so it costs less per key.
local expire_at = tostring(now + tonumber(ARGV[2]))  -- a string: no conversion per key
local e, w, m, l = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local first_id = 12                  -- ARGV[first_id .. last_id]: the ids
local last_id = first_id + e + w + m - 1
local first_key = last_id + 1        -- ARGV[first_key ..]: the W written keys, then M
local first_op = first_key + w + m   -- ARGV[first_op ..]: the M ops
-- The stream holds exactly what is not settled: the batch's entries go by one trim below
-- the oldest kept entry (or past the batch's last id); with a kept entry, those past it
-- go one by one.
if ARGV[5] ~= '' then
  if ARGV[1] == '' then
    local ms, seq = string.match(ARGV[5], '^(%d+)-(%d+)$')
    redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
  else
    redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
    for i = first_id, last_id, 1000 do
      redis.call('XDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, last_id)))
    end
  end
end
-- Each settled key's newest pending operation, in one read.
local newest = {}
local last_key = first_key + w + m - 1
for i = first_key, last_key, 1000 do
  local got = redis.call('HMGET', KEYS[2], unpack(ARGV, i, math.min(i + 999, last_key)))
  if i == first_key then
    newest = got
  else
    for j = 1, #got do newest[i - first_key + j] = got[j] end
  end
end
local done = {}  -- the keys settled: their dirty fields go
local written_id = first_id + e - 1  -- ARGV[written_id + t]: the t-th written key's id
for t = 1, w do
  if newest[t] == ARGV[written_id + t] then
    done[#done + 1] = ARGV[first_key + t - 1]
    redis.call('PEXPIREAT', KEYS[8 + t], expire_at)
  end
end
-- The letters, by key: what the database refused.
local first_letter = first_op + m
for t = 0, m - 1 do
  if ARGV[first_op + t] == 'v' then first_letter = first_letter + 1 end
end
local refused = {}  -- key -> {value = true, ...}
for i = first_letter, first_letter + 6 * l - 1, 6 do
  local key = ARGV[i]
  refused[key] = refused[key] or {}
  refused[key][ARGV[i + 2]] = true
end
local current = {}  -- key -> true: settled here
local value_at = first_op + m  -- the next "v" op's value
for t = 0, m - 1 do
  local key, id, op = ARGV[first_key + w + t], ARGV[written_id + w + 1 + t], ARGV[first_op + t]
  local entry = KEYS[9 + w + t]
  local value = nil
  if op == 'v' then
    value = ARGV[value_at]
    value_at = value_at + 1
  end
  if newest[w + t + 1] == id then
    current[key] = true
    done[#done + 1] = key
    if op == 'd' or op == 'x' then
      -- A delete won, or the database refused the key's operations: the cache must
      -- not serve what it refused, nor a row it no longer has.
      redis.call('DEL', entry)
    elseif op == 'v' then
      redis.call('SET', entry, value, 'PXAT', expire_at)
    elseif string.sub(op, 1, 2) == 's:' then
      -- The write lost to a newer version in the database. Keep the entry only if
      -- it already holds a newer version than the one that lost; else drop it.
      local lost, column = string.match(op, '^s:(%-?%d+):(.*)$')
      local cached = redis.call('GET', entry)
      local keep = false
      if cached and cached ~= 'null' then
        local ok, row = pcall(cjson.decode, cached)
        keep = ok and type(row) == 'table' and tonumber(row[column]) ~= nil
          and tonumber(row[column]) > tonumber(lost)
      end
      if keep then redis.call('PEXPIREAT', entry, expire_at) else redis.call('DEL', entry) end
    else
      redis.call('PEXPIREAT', entry, expire_at)
    end
  elseif (op == 'x' or op == 'v') and refused[key] and newest[w + t + 1] then
    -- A newer write is pending, but the entry may still hold the refused value (a
    -- write of a lower version keeps a higher one cached): it gets the newest pending
    -- operation's value, as that write's enqueue would have set it.
    local cached = redis.call('GET', entry)
    if cached and refused[key][cached] then
      local pending = redis.call('XRANGE', KEYS[1], newest[w + t + 1], newest[w + t + 1])
      local whole = nil  -- the pending operation's row, if it is a whole one
      if #pending > 0 then
        local fields, o, v = pending[1][2], nil, nil
        for f = 1, #fields, 2 do
          if fields[f] == 'o' then o = fields[f + 1] elseif fields[f] == 'v' then v = fields[f + 1] end
        end
        if o ~= 'p' then whole = v end
      end
      -- A partial write's columns alone are not the row: drop the entry instead.
      if whole then redis.call('SET', entry, whole) else redis.call('DEL', entry) end
    end
  end
end
local dead = 0
for i = first_letter, first_letter + 6 * l - 1, 6 do
  local key = ARGV[i]
  local dead_id = redis.call('XADD', KEYS[3], '*', 'o', ARGV[i + 1], 'k', key,
    'v', ARGV[i + 2], 'n', ARGV[i + 3], 'error', ARGV[i + 4],
    'stream_id', ARGV[i + 5], 'shard', ARGV[3], 'failed_at_ms', ARGV[4])
  -- The key's newest dead letter, replayable while no newer write of the key came.
  if current[key] then redis.call('HSET', KEYS[4], key, dead_id) end
  dead = dead + 1
end
local settled = #done
for i = 1, settled, 1000 do
  redis.call('HDEL', KEYS[2], unpack(done, i, math.min(i + 999, settled)))
end
if warming and settled > 0 then
  local touched = {}
  for i = 1, settled do
    touched[#touched + 1] = now
    touched[#touched + 1] = done[i]
  end
  for i = 1, #touched, 1000 do
    redis.call('ZADD', KEYS[6], unpack(touched, i, math.min(i + 999, #touched)))
  end
  redis.call('PEXPIRE', KEYS[6], redis.call('PTTL', KEYS[5]) + 1000)
end
return {settled, dead, extended, redis.call('XLEN', KEYS[3])}
