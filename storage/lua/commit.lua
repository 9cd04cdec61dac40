-- Commit learned state and the new learned offset, all or nothing.
-- KEYS[1] = cursor hash, KEYS[2] = dead-letter list, KEYS[3] = counters hash,
-- KEYS[4..] = state keys.
-- ARGV[1] = learned offset the learner read, ARGV[2] = new learned offset,
-- ARGV[3] = number of runs learned, ARGV[4] = number of dead letters d,
-- ARGV[5 .. 4+d] = dead-letter entries, ARGV[5+d ..] = values for KEYS[4..].
-- The offset is the fencing token: if another learner committed since we
-- read, nothing is written and -1 is returned; otherwise the new version.
-- Runs that could not be learned are dead-lettered in the same step as the
-- offset moves past them, so none is skipped without a trace.
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned') or '0')
if learned ~= tonumber(ARGV[1]) then
  redis.call('HINCRBY', KEYS[3], 'conflicts', 1)
  return -1
end
local dead = tonumber(ARGV[4])
for i = 1, dead do
  redis.call('RPUSH', KEYS[2], ARGV[4 + i])
end
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + dead + 1])
end
redis.call('HSET', KEYS[1], 'learned', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'runs_learned', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[3], 'commits', 1)
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dead_letters', dead) end
return redis.call('HINCRBY', KEYS[1], 'version', 1)
