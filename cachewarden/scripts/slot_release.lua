-- Give back a due time this scheduler claimed but whose run it could not send (the
-- broker failed): the job's record returns to the claim before it, so the due time
-- can be claimed and fired again (by this scheduler's retry or any one's catch-up),
-- still once: the claim stays the one way to fire it.
-- KEYS: 1 the job's schedule record (hash)
-- ARGV: 1 slot (ms since the epoch), 2 the scheduler's name, 3 the send's error
-- Returns 1 when given back, 0 when the record holds another claim (a later slot).
local held = redis.call('HMGET', KEYS[1], 'slot', 'slot_by')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then return 0 end
local prev = redis.call('HMGET', KEYS[1], 'prev_slot', 'prev_by', 'prev_clock')
if prev[1] and prev[1] ~= '' then
  redis.call('HSET', KEYS[1], 'slot', prev[1], 'slot_by', prev[2], 'slot_clock', prev[3])
else
  redis.call('HDEL', KEYS[1], 'slot', 'slot_by', 'slot_clock')
end
redis.call('HDEL', KEYS[1], 'prev_slot', 'prev_by', 'prev_clock')
redis.call('HINCRBY', KEYS[1], 'fired', -1)
redis.call('HINCRBY', KEYS[1], 'unsent', 1)
redis.call('HSET', KEYS[1], 'unsent_slot', ARGV[1], 'unsent_error', ARGV[3])
return 1
