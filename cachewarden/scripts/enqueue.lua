-- Buffer writes and deletes: for each operation, set its cache entry and append it
-- to its shard's stream, atomically. write() sends one operation, write_many() many.
-- KEYS: 1 due zset, 2 dead-letter keys hash, 3 dead-letter stream, 4 recorded shard
--       count, 5 memory mark, 6 the entity's tombstones marker (set while any of its
--       tombstones may live), then 5 per operation: entry, stream, dirty hash, lease,
--       tombstone
-- ARGV: 1 max_pending, 2 batch_size, 3 max_delay_ms, 4 version column name ("" for none),
--       5 tombstone_ttl_ms, 6 max_dead_letters, 7 the writer's shard count, 8 the memory
--       headroom (a share of maxmemory), then 5 per operation: op ("w" write, "p" write of
--       some of the row's columns (merged into the cached row),
--       "d" delete), key, value (JSON; "null" for a delete), version ("" for none),
--       due member ("entity:shard")
-- A versioned delete leaves a tombstone (its version, for tombstone_ttl_ms); a versioned
-- operation at a version no higher than the key's tombstone is ignored.
-- Returns one reply per operation: its stream id, "!BACKPRESSURE <pending>" when its
-- shard holds max_pending unflushed operations, "!DEADLETTERS <n>" when the entity
-- holds max_dead_letters, or "!TOMBSTONE <version>" when a delete at that version
-- outranks it (none of these was taken). The first write records the shard count;
-- a writer whose count differs from the record (or any writer while a reshard runs,
-- the record then "N>M") gets "!SHARDS <record>" for every operation, none taken; so
-- every writer while Redis is within the memory headroom of maxmemory (looked at
-- INFO memory at most every 100 ms, through the mark): "!MEMORY <used> <max>".
if redis.replicate_commands then redis.replicate_commands() end
-- A JSON text's end of string starting at i (its opening quote): the index past it.
local function past_string(text, i)
  local j = i + 1
  while true do
    local at = string.find(text, '["\\]', j)
    if not at then return nil end
    if string.sub(text, at, at) == '"' then return at + 1 end
    j = at + 2
  end
end
-- The index past the JSON value starting at i.
local function past_value(text, i)
  local c = string.sub(text, i, i)
  if c == '"' then return past_string(text, i) end
  if c ~= '{' and c ~= '[' then
    local stop = string.find(text, '[,}%]%s]', i)
    return stop or #text + 1
  end
  local depth, j = 0, i
  while true do
    local at = string.find(text, '[%[%]{}"]', j)
    if not at then return nil end
    local d = string.sub(text, at, at)
    if d == '"' then
      j = past_string(text, at)
      if not j then return nil end
    else
      if d == '{' or d == '[' then depth = depth + 1 else depth = depth - 1 end
      j = at + 1
      if depth == 0 then return j end
    end
  end
end
-- A JSON object's members as {key text, value text} pairs, taken as they are written
-- (no number goes through a Lua double: 64-bit integers and long decimals survive);
-- nil for anything that is not an object.
local function members(text)
  local i = string.find(text, '%S')
  if not i or string.sub(text, i, i) ~= '{' then return nil end
  local out = {}
  i = string.find(text, '%S', i + 1)
  if i and string.sub(text, i, i) == '}' then return out end
  while i do
    if string.sub(text, i, i) ~= '"' then return nil end
    local after = past_string(text, i)
    if not after then return nil end
    local name = string.sub(text, i, after - 1)
    local colon = string.find(text, '%S', after)
    if not colon or string.sub(text, colon, colon) ~= ':' then return nil end
    local start = string.find(text, '%S', colon + 1)
    if not start then return nil end
    local stop = past_value(text, start)
    if not stop then return nil end
    out[#out + 1] = {name, string.sub(text, start, stop - 1)}
    i = string.find(text, '%S', stop)
    if not i then return nil end
    local c = string.sub(text, i, i)
    if c == '}' then return out end
    if c ~= ',' then return nil end
    i = string.find(text, '%S', i + 1)
  end
  return nil
end
-- The cached row `old` with the columns of the partial row `new` written over it; nil
-- when either is not a JSON object.
local function merged(old, new)
  local a, b = members(old), members(new)
  if not a or not b then return nil end
  local written, parts = {}, {}
  for _, m in ipairs(b) do written[m[1]] = true end
  for _, m in ipairs(a) do
    if not written[m[1]] then parts[#parts + 1] = m[1] .. ':' .. m[2] end
  end
  for _, m in ipairs(b) do parts[#parts + 1] = m[1] .. ':' .. m[2] end
  return '{' .. table.concat(parts, ',') .. '}'
end
local max_pending, batch_size = tonumber(ARGV[1]), tonumber(ARGV[2])
local column, tomb_ttl = ARGV[4], ARGV[5]
local count = (#ARGV - 8) / 5
local function refuse_all(reply)
  local out = {}
  for i = 1, count do out[i] = reply end
  return out
end
-- Memory: the mark says "ok" for 100 ms after a look at INFO, or "<used> <max>" for
-- 1 s while Redis is within the headroom of maxmemory; without a mark, or for a call
-- carrying more than 64 KB, look now.
local bytes = 0
for i = 0, count - 1 do bytes = bytes + #ARGV[11 + i * 5] end
local memory = redis.call('GET', KEYS[5])
if not memory or (memory == 'ok' and bytes > 65536) then
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
if memory ~= 'ok' then return refuse_all('!MEMORY ' .. memory) end
local recorded = redis.call('GET', KEYS[4])
if not recorded then
  redis.call('SET', KEYS[4], ARGV[7])
elseif recorded ~= ARGV[7] then
  return refuse_all('!SHARDS ' .. recorded)
end
local dead = redis.call('XLEN', KEYS[3])
if dead >= tonumber(ARGV[6]) then return refuse_all('!DEADLETTERS ' .. dead) end
-- Read once per call: most calls need neither a tombstone look nor a dead-letter clear.
local tombs = column ~= '' and redis.call('EXISTS', KEYS[6]) == 1
local letters = redis.call('EXISTS', KEYS[2]) == 1
local pending = {}  -- stream -> its length, read once
local full = {}     -- due member -> true when its shard holds a batch
local due = {}      -- due members written to, in order
local out = {}
for i = 0, count - 1 do
  local a, k = 8 + i * 5, 6 + i * 5
  local op, key, value, version, member = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local entry, stream, dirty, lease = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local tomb = KEYS[k + 5]
  local n = pending[stream]
  if n == nil then n = redis.call('XLEN', stream) end
  local buried = false  -- the version of a delete that outranks this operation
  if tombs and version ~= '' then
    local at = redis.call('GET', tomb)
    if at and tonumber(at) >= tonumber(version) then buried = at end
  end
  if buried then
    out[#out + 1] = '!TOMBSTONE ' .. buried
  elseif n >= max_pending then
    out[#out + 1] = '!BACKPRESSURE ' .. n
  else
    local keep_cache = false
    local current = nil
    if op == 'p' or (column ~= '' and version ~= '') then current = redis.call('GET', entry) end
    if column ~= '' and version ~= '' then
      if current and current ~= 'null' then
        local ok, row = pcall(cjson.decode, current)
        if ok and type(row) == 'table' and tonumber(row[column]) and
           tonumber(row[column]) > tonumber(version) then
          keep_cache = true
        end
      end
    end
    if not keep_cache then
      -- No TTL while the write is pending: the entry cannot expire before the
      -- database holds it. The flusher sets the TTL once the write is committed.
      if op ~= 'p' then
        redis.call('SET', entry, value)
      else
        -- Some of the row's columns: written over the cached row's. With no row cached,
        -- the entry goes: a read waits for the flush and loads the whole row then,
        -- never serving the written columns alone.
        local whole = current and current ~= 'null' and merged(current, value)
        if whole then redis.call('SET', entry, whole) else redis.call('DEL', entry) end
      end
    end
    local id
    if version ~= '' then
      id = redis.call('XADD', stream, '*', 'o', op, 'k', key, 'v', value, 'n', version)
    else
      id = redis.call('XADD', stream, '*', 'o', op, 'k', key, 'v', value)
    end
    redis.call('HSET', dirty, key, id)
    if op == 'd' and version ~= '' and column ~= '' then
      redis.call('SET', tomb, version, 'PX', tomb_ttl)
      redis.call('SET', KEYS[6], '1', 'PX', tomb_ttl)
      tombs = true
    end
    if letters then redis.call('HDEL', KEYS[2], key) end
    -- A load or refresh of this key that began before now must not fill the cache.
    redis.call('DEL', lease)
    n = n + 1
    if full[member] == nil then due[#due + 1] = member; full[member] = false end
    if n >= batch_size then full[member] = true end
    out[#out + 1] = id
  end
  pending[stream] = n
end
if #due > 0 then
  local t = redis.call('TIME')
  local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
  for _, member in ipairs(due) do
    if full[member] then
      redis.call('ZADD', KEYS[1], 0, member)
    else
      redis.call('ZADD', KEYS[1], 'NX', deadline, member)
    end
  end
end
return out
