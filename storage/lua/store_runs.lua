-- Store run records idempotently, each with its index entry, atomically.
-- KEYS: for each run i: KEYS[3i-2] = run key, KEYS[3i-1] = runs_index key,
--       KEYS[3i] = the agent's tombstone zset (ids retention trimmed);
--       last KEYS entry = the set of known agents.
-- ARGV: for each run i: ARGV[2i-1] = run JSON, ARGV[2i] = run id;
--       then one agent id per run (ARGV[2n + i]).
-- Returns one integer per run: 1 stored now, 0 already present (or trimmed).
-- SET NX decides; the RPUSH happens in the same script, so no client ever
-- sees an index entry without its run key, and a retried store adds nothing.
local n = (#KEYS - 1) / 3
local agents = KEYS[#KEYS]
local out = {}
for i = 1, n do
  if redis.call('ZSCORE', KEYS[3 * i], ARGV[2 * i]) then
    out[i] = 0
  elseif redis.call('SET', KEYS[3 * i - 2], ARGV[2 * i - 1], 'NX') then
    redis.call('RPUSH', KEYS[3 * i - 1], ARGV[2 * i])
    redis.call('SADD', agents, ARGV[2 * n + i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
