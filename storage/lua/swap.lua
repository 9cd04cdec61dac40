-- Rebuild: swap staged state in, all at once, with the offset it covers.
-- KEYS[1] = cursor hash, KEYS[2] = the agent's learning-key set, then pairs
-- (staging key, target key), then keys to delete (state the rebuild no
-- longer produces).
-- ARGV[1] = number of pairs, ARGV[2] = learned offset the staged state covers,
-- ARGV[3] = number of learning keys k, ARGV[4 .. 3+k] = the learning keys the
-- rebuilt state has (they replace the set's members).
-- Readers see the old state or the new one, never a mix. A learner that read
-- the old offset loses its compare-and-set and re-reads; runs past the new
-- offset are learned on top of the rebuilt state, so each is counted once.
local pairs_n = tonumber(ARGV[1])
for i = 1, pairs_n do
  redis.call('RENAME', KEYS[2 * i + 1], KEYS[2 * i + 2])
end
for i = 2 * pairs_n + 3, #KEYS do
  redis.call('DEL', KEYS[i])
end
redis.call('DEL', KEYS[2])
for i = 1, tonumber(ARGV[3]) do
  redis.call('SADD', KEYS[2], ARGV[3 + i])
end
redis.call('HSET', KEYS[1], 'learned', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'version', 1)
