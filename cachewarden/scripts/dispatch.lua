-- The shards whose flush is due: deadline passed (or batch full, score 0).
-- KEYS: 1 due zset
-- ARGV: 1 the most shards to return
-- Returns the due members ("entity:shard"), oldest deadline first. The caller then
-- claims each with its queued marker (SET NX), so one flush is sent per due time.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
