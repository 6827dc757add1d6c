#!lua flags=allow-oom
-- allow-oom: it only frees memory, and an operator must be able to free it at the limit.
-- Delete one dead letter for good, and forget it as its key's newest letter only where
-- it still is: one script, so a newer letter of the key that a flush made between a
-- read and a delete keeps its mark (and stays replayable).
-- KEYS: 1 dead-letter stream, 2 dead-letter keys hash (key -> its newest letter's id)
-- ARGV: 1 the dead letter's id
-- Returns 1 when the letter was deleted, 0 when it was not held.
local letter = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #letter == 0 then return 0 end
local fields = letter[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'k' and redis.call('HGET', KEYS[2], fields[i + 1]) == ARGV[1] then
    redis.call('HDEL', KEYS[2], fields[i + 1])
  end
end
return redis.call('XDEL', KEYS[1], ARGV[1])
