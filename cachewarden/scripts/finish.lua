-- After a committed flush: acknowledge and delete the entries, and give each
-- flushed key its TTL back (or drop its delete marker) unless a newer write
-- for it is still pending.
-- KEYS: 1 stream, 2 dirty hash, then the entry of each settled key, in triple order
-- op: "w" written, "d" deleted, "x" refused by the database (dead-lettered),
--     "s:<version>:<column>" outranked: the database kept a newer version than <version>
-- ARGV: 1 group, 2 ttl_ms, 3 number of ids N,
--       4..3+N stream ids, then triples (key, id of its applied write, op)
local n = tonumber(ARGV[3])
if n > 0 then
  local ids = {}
  for i = 1, n do ids[i] = ARGV[3 + i] end
  for i = 1, #ids, 1000 do
    local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
    redis.call('XACK', KEYS[1], ARGV[1], unpack(chunk))
    redis.call('XDEL', KEYS[1], unpack(chunk))
  end
end
local settled = 0
for i = 4 + n, #ARGV, 3 do
  local key, id, op = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HGET', KEYS[2], key) == id then
    redis.call('HDEL', KEYS[2], key)
    local entry = KEYS[3 + (i - 4 - n) / 3]
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
return settled
