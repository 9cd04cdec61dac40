-- Retention: drop the oldest learned runs of one agent, atomically.
-- KEYS[1] = cursor hash, KEYS[2] = runs_index, KEYS[3] = tombstone zset,
-- KEYS[4] = stored-at zset (its entries for dropped runs go too).
-- ARGV[1] = run key prefix, ARGV[2] = how many to drop (at most),
-- ARGV[3] = tombstone score (now, seconds), ARGV[4] = tombstones kept (cap).
-- Only LEARNED entries are ever dropped (never past learned - base), the
-- index is trimmed and `base` advanced in the same step, so absolute offsets
-- (and every learner's fencing token) stay right. Dropped ids are kept as
-- tombstones (capped) so a late duplicate of a trimmed run is not stored and
-- learned a second time. Returns the number dropped.
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned') or '0')
local base = tonumber(redis.call('HGET', KEYS[1], 'base') or '0')
local n = math.min(tonumber(ARGV[2]), learned - base, redis.call('LLEN', KEYS[2]))
if n <= 0 then return 0 end
local ids = redis.call('LRANGE', KEYS[2], 0, n - 1)
for i = 1, #ids, 500 do
  local keys = {}
  local members = {}
  for j = i, math.min(i + 499, #ids) do
    keys[#keys + 1] = ARGV[1] .. ids[j]
    members[#members + 1] = ARGV[3]
    members[#members + 1] = ids[j]
  end
  redis.call('DEL', unpack(keys))
  redis.call('ZADD', KEYS[3], unpack(members))
  redis.call('ZREM', KEYS[4], unpack(ids, i, math.min(i + 499, #ids)))
end
redis.call('LTRIM', KEYS[2], n, -1)
redis.call('HINCRBY', KEYS[1], 'base', n)
local cap = tonumber(ARGV[4])
local size = redis.call('ZCARD', KEYS[3])
if size > cap then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, size - cap - 1) end
return n
