#!lua flags=allow-oom
-- allow-oom: it drains the buffer, so it must run when Redis is full.
-- Claim due shards for flushing: set each one's queued marker unless it is set.
-- KEYS: the queued marker of each shard   ARGV: 1 ttl_ms
-- Returns, per shard, 1 when this call claimed it, 0 when a flush is already queued.
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('SET', key, 'queued', 'NX', 'PX', ARGV[1]) and 1 or 0
end
return out
