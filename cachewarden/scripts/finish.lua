#!lua flags=allow-oom
-- allow-oom: it drains the buffer, so it must run when Redis is full.
-- After a committed flush: acknowledge and delete the entries, move the operations the
-- database refused to the dead-letter stream, and give each flushed key its TTL back
-- (or drop its delete marker), all at once: a crash leaves either the whole batch
-- pending (and applied again) or none of it.
-- Each key settles only while the operation the flush applied is still its newest
-- pending one; a key written again meanwhile is left to that newer write (a refused
-- operation it superseded leaves no dead letter: the newer write replaces it).
-- While a warm run of the entity is reading (its marker is set), each settled key is
-- recorded as touched now: a chunk read before this flush must not fill it.
-- Per key: one HMGET field, one HDEL field (batched) and one PEXPIREAT; per entry one
-- XACK id; the entries themselves go by one XTRIM.
-- It also extends the shard's flush lock (and queued marker) while the owner holds it,
-- as lock_extend.lua does, and reports the dead letters held: the flusher's checks
-- before its next batch, without round trips of their own.
-- KEYS: 1 stream, 2 dirty hash, 3 dead-letter stream, 4 dead-letter keys hash,
--       5 warming marker, 6 touched keys zset, 7 flush lock, 8 queued marker, then the
--       entry of each written key, then the entry of each other key (both in the order
--       of their keys in ARGV)
-- op: "d" deleted, "x" refused by the database (dead-lettered),
--     "s:<version>:<column>" outranked: the database kept a newer version than <version>
-- ARGV: 1 group, 2 ttl_ms, 3 shard, 4 now_ms, 5 the batch's last stream id ("" for none),
--       6 lock owner ("": leave the lock be), 7 lock ttl_ms, 8 E, 9 W, 10 M, then the
--       E + W + M ids to acknowledge: E besides the settled ones (superseded operations,
--       deleted entries), then the id of each written key's applied write, then the id
--       of each other key's applied operation; then the W + M keys (written, other);
--       then the M ops; then for each "x" op, in order, its letter: o, v, n (version,
--       ""), error, stream_id. The regions go to XACK and HMGET as they are.
-- Returns {keys settled, dead letters added, 1 if the lock was extended (0: the owner
-- no longer holds it, -1: not asked), dead letters the entity holds}.
local warming = redis.call('EXISTS', KEYS[5]) == 1
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_touched = now
-- The TTL given back, as an absolute time: PEXPIREAT is what Redis would rewrite a
-- PEXPIRE into, so it costs less per key.
local expire_at = tostring(now + tonumber(ARGV[2]))  -- a string: no conversion per key
local e, w, m = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local first_id = 11                  -- ARGV[first_id .. last_id]: the ids to acknowledge
local last_id = first_id + e + w + m - 1
local first_key = last_id + 1        -- ARGV[first_key ..]: the W written keys, then M
local first_op = first_key + w + m   -- ARGV[first_op ..]: the M ops
local n = last_id - first_id + 1
if n > 0 then
  for i = first_id, last_id, 1000 do
    redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, math.min(i + 999, last_id)))
  end
  -- Delete the acknowledged entries by trimming the stream below its oldest entry
  -- still unacknowledged (or past the batch's last id): whole nodes go at once, where
  -- XDEL takes entry by entry. The entries of the batch past an older unacknowledged
  -- one (a row held by a lock) are XDELed, so the stream's length stays its pending
  -- writes.
  local ms, seq = string.match(ARGV[5], '^(%d+)-(%d+)$')
  local past = ms .. '-' .. (tonumber(seq) + 1)
  local minid = past
  local oldest = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1)
  if #oldest > 0 then
    local oms, oseq = string.match(oldest[1][1], '^(%d+)-(%d+)$')
    if tonumber(oms) < tonumber(ms) or (oms == ms and tonumber(oseq) <= tonumber(seq)) then
      minid = oldest[1][1]
    end
  end
  redis.call('XTRIM', KEYS[1], 'MINID', minid)
  if minid ~= past then
    local mms, mseq = string.match(minid, '^(%d+)-(%d+)$')
    mms, mseq = tonumber(mms), tonumber(mseq)
    local later = {}
    for i = first_id, last_id do
      local ims, iseq = string.match(ARGV[i], '^(%d+)-(%d+)$')
      ims, iseq = tonumber(ims), tonumber(iseq)
      if ims > mms or (ims == mms and iseq >= mseq) then later[#later + 1] = ARGV[i] end
    end
    for i = 1, #later, 1000 do
      redis.call('XDEL', KEYS[1], unpack(later, i, math.min(i + 999, #later)))
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
local letter = first_op + m  -- the next letter's fields
local dead = 0
for t = 0, m - 1 do
  local key, id, op = ARGV[first_key + w + t], ARGV[written_id + w + 1 + t], ARGV[first_op + t]
  local current = newest[w + t + 1] == id
  if op == 'x' then
    if current then
      local dead_id = redis.call('XADD', KEYS[3], '*', 'o', ARGV[letter], 'k', key,
        'v', ARGV[letter + 1], 'n', ARGV[letter + 2], 'error', ARGV[letter + 3],
        'stream_id', ARGV[letter + 4], 'shard', ARGV[3], 'failed_at_ms', ARGV[4])
      redis.call('HSET', KEYS[4], key, dead_id)
      dead = dead + 1
    end
    letter = letter + 5
  end
  if current then
    done[#done + 1] = key
    local entry = KEYS[9 + w + t]
    if op == 'd' then
      -- The delete won. The entry holds its 'null' marker, or a write that lost to it
      -- on version (cached when it was enqueued): either way, drop it.
      redis.call('DEL', entry)
    elseif op == 'x' then
      -- dead-lettered: the database refused it, so the cache must not serve it
      redis.call('DEL', entry)
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
  end
end
local settled = #done
for i = 1, settled, 1000 do
  redis.call('HDEL', KEYS[2], unpack(done, i, math.min(i + 999, settled)))
end
if warming and settled > 0 then
  local touched = {}
  for i = 1, settled do
    touched[#touched + 1] = now_touched
    touched[#touched + 1] = done[i]
  end
  for i = 1, #touched, 1000 do
    redis.call('ZADD', KEYS[6], unpack(touched, i, math.min(i + 999, #touched)))
  end
  redis.call('PEXPIRE', KEYS[6], redis.call('PTTL', KEYS[5]) + 1000)
end
local extended = -1
if ARGV[6] ~= '' then
  extended = 0
  if redis.call('GET', KEYS[7]) == ARGV[6] then
    redis.call('PEXPIRE', KEYS[7], ARGV[7])
    redis.call('SET', KEYS[8], ARGV[6], 'PX', ARGV[7])
    extended = 1
  end
end
return {settled, dead, extended, redis.call('XLEN', KEYS[3])}
