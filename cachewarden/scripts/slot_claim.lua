-- Claim one due time (slot) of a warming job for this scheduler: at most one claim
-- per slot across every scheduler, and never a slot at or before the last one claimed
-- (a replica whose clock runs behind asks for a slot that is already done).
-- A claim to fire keeps the claim before it (prev_*), so that a scheduler whose send
-- failed can give the slot back (slot_release.lua) and it can be claimed again.
-- KEYS: 1 the job's schedule record (hash)
-- ARGV: 1 slot (ms since the epoch), 2 the scheduler's clock (ms), 3 the scheduler's
--       name, 4 "fire" (claim it to run) or "missed" (too late to run: record it)
-- Returns 1 when claimed, 0 when the slot (or a later one) was claimed already.
local last = tonumber(redis.call('HGET', KEYS[1], 'slot'))
if last and last >= tonumber(ARGV[1]) then return 0 end
if ARGV[4] == 'missed' then
  redis.call('HDEL', KEYS[1], 'prev_slot', 'prev_by', 'prev_clock')
else
  local prev = redis.call('HMGET', KEYS[1], 'slot', 'slot_by', 'slot_clock')
  redis.call('HSET', KEYS[1], 'prev_slot', prev[1] or '', 'prev_by', prev[2] or '',
    'prev_clock', prev[3] or '')
end
redis.call('HSET', KEYS[1], 'slot', ARGV[1], 'slot_by', ARGV[3], 'slot_clock', ARGV[2])
if ARGV[4] == 'missed' then
  redis.call('HINCRBY', KEYS[1], 'missed', 1)
  redis.call('HSET', KEYS[1], 'missed_slot', ARGV[1])
else
  redis.call('HINCRBY', KEYS[1], 'fired', 1)
end
return 1
