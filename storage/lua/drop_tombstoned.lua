-- Ends the MULTI/EXEC of `Store.store_runs_detailed`: the SET NX before it
-- wrote every run of the batch, also one retention had dropped (index_runs.lua
-- reported it as tombstoned and did not index it); delete that key again, so a
-- re-submitted old run leaves nothing behind.
-- KEYS: for each run i: KEYS[2i-1] = run key, KEYS[2i] = the agent's tombstone zset.
-- ARGV: for each run i: ARGV[i] = run id.
-- Returns the number of keys deleted.
local deleted = 0
local has_tombstones = {}
for i = 1, #ARGV do
  local tombstones = KEYS[2 * i]
  if has_tombstones[tombstones] == nil then
    has_tombstones[tombstones] = redis.call('EXISTS', tombstones) == 1
  end
  if has_tombstones[tombstones] and redis.call('ZSCORE', tombstones, ARGV[i]) then
    deleted = deleted + redis.call('DEL', KEYS[2 * i - 1])
  end
end
return deleted
