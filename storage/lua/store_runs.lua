-- Store run records idempotently, each with its index entry, atomically.
-- KEYS: for each run i: KEYS[4i-3] = run key, KEYS[4i-2] = runs_index key,
--       KEYS[4i-1] = the agent's tombstone zset (ids retention trimmed),
--       KEYS[4i] = the agent's stored-at zset (run id -> server time stored);
--       last KEYS entry = the set of known agents.
-- ARGV: for each run i: ARGV[2i-1] = run JSON, ARGV[2i] = run id;
--       then one agent id per run (ARGV[2n + i]).
-- Returns one value per run: 1 stored now; 0 already present with the same
-- bytes (or trimmed); otherwise the stored JSON, which differs from this one
-- (the caller decides whether that is a conflicting duplicate).
-- SET NX decides; the RPUSH happens in the same script, so no client ever
-- sees an index entry without its run key, and a retried store adds nothing.
-- The stored-at time is the server's clock, not the run's own timestamps:
-- age retention must not trust a client's clock (a run dated 2099 would pin
-- the agent's history forever).
local n = (#KEYS - 1) / 4
local agents = KEYS[#KEYS]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 1, n do
  local run_key, run_id = KEYS[4 * i - 3], ARGV[2 * i]
  if redis.call('ZSCORE', KEYS[4 * i - 1], run_id) then
    out[i] = 0
  elseif redis.call('SET', run_key, ARGV[2 * i - 1], 'NX') then
    redis.call('RPUSH', KEYS[4 * i - 2], run_id)
    redis.call('ZADD', KEYS[4 * i], now, run_id)
    redis.call('SADD', agents, ARGV[2 * n + i])
    out[i] = 1
  else
    local stored = redis.call('GET', run_key)
    if stored == ARGV[2 * i - 1] then out[i] = 0 else out[i] = stored end
  end
end
return out
