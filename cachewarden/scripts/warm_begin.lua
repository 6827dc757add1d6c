-- A chunk of a run begins reading: check the run is still current, keep its lock, and
-- mark the entity as being warmed (flushes then record the keys they settle, see
-- finish.lua), so the chunk's fill can tell which rows a flush made stale.
-- KEYS: 1 run lock, 2 run hash, 3 warming marker, 4 touched keys zset
-- ARGV: 1 run number, 2 lock ttl (ms), 3 the marking horizon (ms): the longest a chunk
--       may take from begin to fill
-- Returns {1, now: the chunk's begin time} or {0, why}: "superseded" (a newer run
-- started), "done"/"failed" (the run ended), "busy" (another run holds the lock),
-- "timeout" (the run outlived its timeout).
local run = ARGV[1]
if redis.call('HGET', KEYS[2], 'run') ~= run then return {0, 'superseded'} end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'running' then return {0, state} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local started = tonumber(redis.call('HGET', KEYS[2], 'started_ms'))
if now - started > tonumber(redis.call('HGET', KEYS[2], 'timeout_ms')) then
  return {0, 'timeout'}
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= run then return {0, 'busy'} end
if not holder then
  -- The lock lapsed with no newer run: this run is still the only one; take it again.
  redis.call('SET', KEYS[1], run, 'PX', ARGV[2])
elseif redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])  -- never shorter: a planned run's lasts to its deadline
end
local since = redis.call('GET', KEYS[3]) or now
redis.call('SET', KEYS[3], since, 'PX', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (now - tonumber(ARGV[3])))
return {1, now}
