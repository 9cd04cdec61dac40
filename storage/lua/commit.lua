-- Commit learned state and the new learned offset, all or nothing.
-- KEYS[1] = cursor hash, KEYS[2..] = state keys.
-- ARGV[1] = learned offset the learner read, ARGV[2] = new learned offset,
-- ARGV[3..] = values for KEYS[2..].
-- The offset is the fencing token: if another learner committed since we
-- read, nothing is written and -1 is returned; otherwise the new version.
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned') or '0')
if learned ~= tonumber(ARGV[1]) then
  return -1
end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'learned', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'version', 1)
