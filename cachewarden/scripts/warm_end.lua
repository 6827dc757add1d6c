-- Move a run towards its end: record its plan, fail it, or finish it once every
-- planned chunk is done. Ending it keeps a copy (the job's last run), a summary in
-- its history (the newest 100) and releases its lock. Recording the plan of a run
-- whose chunks are still to run keeps its lock until the run's deadline.
-- KEYS: 1 run lock, 2 run hash, 3 last-run hash, 4 history list
-- ARGV: 1 run number, 2 "planned" (3 chunks, 4 total rows), "failed" (3 error) or
--       "check"
-- Returns the run's state after the call: "running", "done", "failed", or
-- "superseded" when a newer run replaced it.
local run = ARGV[1]
if redis.call('HGET', KEYS[2], 'run') ~= run then return 'superseded' end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'running' then return state end
local verb = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function finish(outcome, err)
  redis.call('HSET', KEYS[2], 'state', outcome, 'error', err, 'finished_ms', now)
  local fields = redis.call('HGETALL', KEYS[2])
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], unpack(fields))
  local summary = {}
  for i = 1, #fields, 2 do summary[fields[i]] = fields[i + 1] end
  redis.call('LPUSH', KEYS[4], cjson.encode(summary))
  redis.call('LTRIM', KEYS[4], 0, 99)
  if redis.call('GET', KEYS[1]) == run then redis.call('DEL', KEYS[1]) end
  return outcome
end
if verb == 'failed' then return finish('failed', ARGV[3]) end
if verb == 'planned' then
  redis.call('HSET', KEYS[2], 'planned', 1, 'chunks', ARGV[3], 'total', ARGV[4])
end
local planned = redis.call('HGET', KEYS[2], 'planned') == '1'
local chunks = tonumber(redis.call('HGET', KEYS[2], 'chunks'))
if planned and tonumber(redis.call('HGET', KEYS[2], 'chunks_done')) >= chunks then
  return finish('done', '')
end
if verb == 'planned' then
  -- Its chunks wait in the queue, where no process keeps the lock: it lives until the
  -- run's deadline (its start plus the job's timeout). The last chunk, or a failure,
  -- releases it; a chunk that begins after the deadline fails the run (warm_begin.lua).
  local deadline = tonumber(redis.call('HGET', KEYS[2], 'started_ms'))
    + tonumber(redis.call('HGET', KEYS[2], 'timeout_ms'))
  local holder = redis.call('GET', KEYS[1])
  if deadline > now and (not holder or holder == run) then
    redis.call('SET', KEYS[1], run, 'PX', math.max(deadline - now, redis.call('PTTL', KEYS[1])))
  end
end
return 'running'
