-- Store run records idempotently, each with its index entry, atomically.
-- KEYS: for each run i: KEYS[5i-4] = run key, KEYS[5i-3] = runs_index key,
--       KEYS[5i-2] = the agent's tombstone zset (ids retention trimmed),
--       KEYS[5i-1] = the agent's stored-at zset (run id -> server time stored),
--       KEYS[5i] = the agent's cursor hash (for `base`);
--       last KEYS entry = the set of known agents.
-- ARGV: for each run i: ARGV[2i-1] = run JSON, ARGV[2i] = run id;
--       then one agent id per run (ARGV[2n + i]).
-- Returns {outcomes, positions}, one entry per run in each:
--   outcome 1 stored now; 0 already present with the same bytes (or trimmed);
--   otherwise the stored JSON, which differs from this one (the caller
--   decides whether that is a conflicting duplicate);
--   position: the absolute index offset (base + list position) a stored-now
--   run got, -1 for the others. Ingest's fast path learns a run from memory
--   only when the learned offset stands right before these positions.
-- SET NX decides; the RPUSH happens in the same script, so no client ever
-- sees an index entry without its run key, and a retried store adds nothing.
-- The stored-at time is the server's clock, not the run's own timestamps:
-- age retention must not trust a client's clock (a run dated 2099 would pin
-- the agent's history forever).
local n = (#KEYS - 1) / 5
local agents = KEYS[#KEYS]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
local positions = {}
for i = 1, n do
  local run_key, run_id = KEYS[5 * i - 4], ARGV[2 * i]
  positions[i] = -1
  if redis.call('ZSCORE', KEYS[5 * i - 2], run_id) then
    out[i] = 0
  elseif redis.call('SET', run_key, ARGV[2 * i - 1], 'NX') then
    local len = redis.call('RPUSH', KEYS[5 * i - 3], run_id)
    local base = tonumber(redis.call('HGET', KEYS[5 * i], 'base') or '0')
    positions[i] = base + len - 1
    redis.call('ZADD', KEYS[5 * i - 1], now, run_id)
    redis.call('SADD', agents, ARGV[2 * n + i])
    out[i] = 1
  else
    local stored = redis.call('GET', run_key)
    if stored == ARGV[2 * i - 1] then out[i] = 0 else out[i] = stored end
  end
end
return {out, positions}
