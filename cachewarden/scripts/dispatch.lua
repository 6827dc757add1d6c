-- Claim the shards whose flush is due: deadline passed (or batch full, score 0)
-- and no flush already queued or running for them.
-- KEYS: 1 due zset
-- ARGV: 1 queued marker ttl_ms, 2 most shards to claim, 3 stream key prefix ("cw:@wb:")
-- Returns the claimed members ("entity:shard").
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, member in ipairs(due) do
  if redis.call('SET', ARGV[3] .. member .. ':queued', 'queued', 'NX', 'PX', ARGV[1]) then
    claimed[#claimed + 1] = member
  end
end
return claimed
