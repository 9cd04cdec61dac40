-- Commit learned state and the new learned offset, all or nothing.
-- KEYS[1] = cursor hash, KEYS[2] = dead-letter list, KEYS[3] = counters hash,
-- KEYS[4] = the agent's learning-key set, KEYS[5..] = state keys.
-- ARGV[1] = learned offset the learner read, ARGV[2] = new learned offset,
-- ARGV[3] = number of runs learned, ARGV[4] = dead-letter cap,
-- ARGV[5] = number of dead letters d, ARGV[6] = number of learning keys k,
-- ARGV[7 .. 6+d] = dead-letter entries, ARGV[7+d .. 6+d+k] = learning keys,
-- ARGV[7+d+k ..] = values for KEYS[5..].
-- The offset is the fencing token: if another learner committed since we
-- read, nothing is written and -1 is returned; otherwise the new version.
-- Runs that could not be learned are dead-lettered in the same step as the
-- offset moves past them, so none is skipped without a trace. The learning
-- keys whose windows this commit writes are recorded in the agent's own set,
-- so rebuild and retention enumerate exactly its keys, never by a glob that
-- another agent's id could match.
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned') or '0')
if learned ~= tonumber(ARGV[1]) then
  redis.call('HINCRBY', KEYS[3], 'conflicts', 1)
  return -1
end
local cap = tonumber(ARGV[4])
local dead = tonumber(ARGV[5])
local nkeys = tonumber(ARGV[6])
local len = 0
for i = 1, dead do
  len = redis.call('RPUSH', KEYS[2], ARGV[6 + i])
end
if dead > 0 then
  redis.call('HINCRBY', KEYS[3], 'dead_letters', dead)
  if len > cap then
    redis.call('LTRIM', KEYS[2], len - cap, -1)
    redis.call('HINCRBY', KEYS[3], 'dead_letters_trimmed', len - cap)
  end
end
for i = 1, nkeys do
  redis.call('SADD', KEYS[4], ARGV[6 + dead + i])
end
local first = 7 + dead + nkeys
for i = 5, #KEYS do
  redis.call('SET', KEYS[i], ARGV[first + i - 5])
end
redis.call('HSET', KEYS[1], 'learned', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'runs_learned', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[3], 'commits', 1)
return redis.call('HINCRBY', KEYS[1], 'version', 1)
