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
-- KEYS: 1 stream, 2 dirty hash, 3 dead-letter stream, 4 dead-letter keys hash,
--       5 warming marker, 6 touched keys zset, then the entry of each settled key,
--       in triple order
-- op: "w" written, "d" deleted, "x" refused by the database (dead-lettered),
--     "s:<version>:<column>" outranked: the database kept a newer version than <version>
-- ARGV: 1 group, 2 ttl_ms, 3 shard, 4 now_ms, 5 number of ids N, 6..5+N stream ids,
--       then M, then M triples (key, id of its applied operation, op), then for each
--       triple with op "x", in order, its letter: o, v, n (version, ""), error, stream_id
-- Returns {keys settled, dead letters added}.
local warming = redis.call('EXISTS', KEYS[5]) == 1
local now_touched
if warming then
  local t = redis.call('TIME')
  now_touched = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local n = tonumber(ARGV[5])
if n > 0 then
  local ids = {}
  for i = 1, n do ids[i] = ARGV[5 + i] end
  for i = 1, #ids, 1000 do
    local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
    redis.call('XACK', KEYS[1], ARGV[1], unpack(chunk))
  end
  -- Delete the acknowledged entries by trimming the stream below its oldest entry
  -- still unacknowledged (or past the batch's last id, the ids being in stream
  -- order): whole nodes go at once, where XDEL takes entry by entry. The entries
  -- of the batch past an older unacknowledged one (a row held by a lock) are
  -- XDELed, so the stream's length stays its pending writes.
  local ms, seq = string.match(ids[n], '^(%d+)-(%d+)$')
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
    for i = 1, n do
      local ims, iseq = string.match(ids[i], '^(%d+)-(%d+)$')
      ims, iseq = tonumber(ims), tonumber(iseq)
      if ims > mms or (ims == mms and iseq >= mseq) then later[#later + 1] = ids[i] end
    end
    for i = 1, #later, 1000 do
      redis.call('XDEL', KEYS[1], unpack(later, i, math.min(i + 999, #later)))
    end
  end
end
local m = tonumber(ARGV[6 + n])
local first = 7 + n
local letter = first + m * 3  -- the next letter's fields
local settled, dead = 0, 0
for t = 0, m - 1 do
  local i = first + t * 3
  local key, id, op = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local newest = redis.call('HGET', KEYS[2], key) == id
  if op == 'x' then
    if newest then
      local dead_id = redis.call('XADD', KEYS[3], '*', 'o', ARGV[letter], 'k', key,
        'v', ARGV[letter + 1], 'n', ARGV[letter + 2], 'error', ARGV[letter + 3],
        'stream_id', ARGV[letter + 4], 'shard', ARGV[3], 'failed_at_ms', ARGV[4])
      redis.call('HSET', KEYS[4], key, dead_id)
      dead = dead + 1
    end
    letter = letter + 5
  end
  if newest then
    redis.call('HDEL', KEYS[2], key)
    local entry = KEYS[7 + t]
    if warming then redis.call('ZADD', KEYS[6], now_touched, key) end
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
      local current = redis.call('GET', entry)
      local keep = false
      if current and current ~= 'null' then
        local ok, row = pcall(cjson.decode, current)
        keep = ok and type(row) == 'table' and tonumber(row[column]) ~= nil
          and tonumber(row[column]) > tonumber(lost)
      end
      if keep then redis.call('PEXPIRE', entry, ARGV[2]) else redis.call('DEL', entry) end
    else
      redis.call('PEXPIRE', entry, ARGV[2])
    end
    settled = settled + 1
  end
end
if warming and settled > 0 then
  redis.call('PEXPIRE', KEYS[6], redis.call('PTTL', KEYS[5]) + 1000)
end
return {settled, dead}
