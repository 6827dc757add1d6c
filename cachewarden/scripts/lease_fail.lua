-- Give up leases after a failed (or abandoned) load. Each lease still ours becomes a
-- short-lived failure marker, so readers of the key get the error at once instead of
-- all loading again; with px 0 the lease is just released.
-- KEYS: 1 read stats, 2.. leases
-- ARGV: 1 lease token, 2 the error message, 3 px of the marker (0: release),
--       4 the counter to increment ('' none)
local n = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    if tonumber(ARGV[3]) > 0 then
      redis.call('SET', KEYS[i], '!' .. ARGV[2], 'PX', ARGV[3])
    else
      redis.call('DEL', KEYS[i])
    end
    n = n + 1
  end
end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[4], 1) end
return n
