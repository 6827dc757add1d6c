-- Start a run of a warming job, unless a run of it still lives (holds the run lock), or
-- a run for the same due time started already (a redelivered task of a dead worker:
-- the next due time runs instead).
-- KEYS: 1 run lock, 2 run fence counter, 3 run hash, 4 chunks hash, 5 schedule record
-- ARGV: 1 lock ttl (ms), 2 slot ("" for a run on demand), 3 request id (""), 4 who
--       runs it, 5 timeout (ms)
-- Returns {run number, now}, {0, the live run's number} or {-1, the due time last run}.
local started = tonumber(redis.call('HGET', KEYS[5], 'started_slot'))
if ARGV[2] ~= '' and started and started >= tonumber(ARGV[2]) then
  redis.call('HINCRBY', KEYS[5], 'repeats', 1)
  return {-1, started}
end
local holder = redis.call('GET', KEYS[1])
if holder then
  redis.call('HINCRBY', KEYS[5], 'overlaps', 1)
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[5], 'refused_request', ARGV[3], 'refused_by', holder)
  end
  return {0, tonumber(holder)}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local run = redis.call('INCR', KEYS[2])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[5], 'started_slot', ARGV[2]) end
redis.call('SET', KEYS[1], run, 'PX', ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('HSET', KEYS[3], 'run', run, 'slot', ARGV[2], 'request', ARGV[3], 'by', ARGV[4],
  'state', 'running', 'started_ms', now, 'timeout_ms', ARGV[5], 'planned', 0, 'chunks', 0,
  'chunks_done', 0, 'total', -1, 'rows', 0, 'filled', 0, 'skipped', 0, 'invalid', 0)
return {run, now}
