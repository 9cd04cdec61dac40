-- Index a batch of runs whose run keys the same MULTI/EXEC writes right after
-- this script (SET NX each, `Store.store_runs_detailed`); run bodies never
-- pass through Lua: turning ARGV into Lua strings costs the server ~1.1 ms
-- per MB, so a 500-run batch held it (and the waiting worker) for 5 ms
-- before a single command ran.
-- KEYS: for each run i: KEYS[5i-4] = run key, KEYS[5i-3] = runs_index key,
--       KEYS[5i-2] = the agent's tombstone zset (ids retention trimmed),
--       KEYS[5i-1] = the agent's stored-at zset (run id -> server time stored),
--       KEYS[5i] = the agent's cursor hash (for `base`);
--       last KEYS entry = the set of known agents.
-- ARGV: for each run i: ARGV[i] = run id; then one agent id per run (ARGV[n + i]).
-- Returns {outcomes, positions}, one entry per run in each:
--   outcome 1: new (its key does not exist yet, and it is its first time in
--   the batch): indexed now, and the SET NX that follows stores it;
--   0: retention dropped it (tombstoned): not indexed, and the tombstone
--   script that ends the transaction deletes the key the SET creates;
--   -1: stored already (or earlier in this batch): the caller compares the
--   stored bytes with its own (a duplicate, or a conflicting one).
--   position: the absolute index offset (base + list position) a new run
--   got, -1 for the others. Ingest's fast path learns a run from memory
--   only when the learned offset stands right before these positions.
-- Atomicity comes from MULTI/EXEC: no client ever sees an index entry
-- without its run key, and a retried store finds every key and adds nothing.
-- The stored-at time is the server's clock, not the run's own timestamps:
-- age retention must not trust a client's clock (a run dated 2099 would pin
-- the agent's history forever).
-- Per run one EXISTS (and a ZSCORE when the agent has tombstones at all);
-- the index, stored-at, cursor and agents commands are one per agent: a
-- redis.call costs ~3 us whatever it does.
local n = (#KEYS - 1) / 5
local agents = KEYS[#KEYS]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
local positions = {}
local has_tombstones = {}
local seen = {}
local groups = {} -- runs_index key -> the agent's new runs, in batch order
local order = {}
for i = 1, n do
  local run_key, run_id, tombstones = KEYS[5 * i - 4], ARGV[i], KEYS[5 * i - 2]
  positions[i] = -1
  if has_tombstones[tombstones] == nil then
    has_tombstones[tombstones] = redis.call('EXISTS', tombstones) == 1
  end
  if has_tombstones[tombstones] and redis.call('ZSCORE', tombstones, run_id) then
    out[i] = 0
  elseif seen[run_key] or redis.call('EXISTS', run_key) == 1 then
    out[i] = -1
  else
    seen[run_key] = true
    local index = KEYS[5 * i - 3]
    local group = groups[index]
    if group == nil then
      group = {ids = {}, runs = {}, i = i}
      groups[index] = group
      order[#order + 1] = index
    end
    group.ids[#group.ids + 1] = run_id
    group.runs[#group.runs + 1] = i
    out[i] = 1
  end
end
-- unpack() puts every argument on Lua's C stack (8000 slots): chunks of 500.
local CHUNK = 500
for _, index in ipairs(order) do
  local group = groups[index]
  local ids, first = group.ids, group.i
  local len = 0
  local stamped = {}
  for j = 1, #ids, CHUNK do
    local last = math.min(j + CHUNK - 1, #ids)
    len = redis.call('RPUSH', index, unpack(ids, j, last))
    for k = j, last do
      stamped[2 * (k - j) + 1] = now
      stamped[2 * (k - j) + 2] = ids[k]
    end
    redis.call('ZADD', KEYS[5 * first - 1], unpack(stamped, 1, 2 * (last - j + 1)))
  end
  local base = tonumber(redis.call('HGET', KEYS[5 * first], 'base') or '0')
  local start = base + len - #ids -- the absolute offset of this batch's first new run
  for k, i in ipairs(group.runs) do
    positions[i] = start + k - 1
  end
  redis.call('SADD', agents, ARGV[n + first])
end
return {out, positions}
