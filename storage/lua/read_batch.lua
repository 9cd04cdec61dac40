-- One round trip for everything a learn batch needs.
-- KEYS[1] = cursor hash, KEYS[2] = runs_index, KEYS[3..] = state keys to GET.
-- ARGV[1] = run key prefix (run key = prefix .. run id), ARGV[2] = max runs,
-- ARGV[3] = list position to start at, or -1 for the learned offset.
-- Returns {learned, base, version, index length, run ids, run values, state values}
-- where run values line up with run ids (false where a run key is missing).
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned') or '0')
local base = tonumber(redis.call('HGET', KEYS[1], 'base') or '0')
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local llen = redis.call('LLEN', KEYS[2])
local start = tonumber(ARGV[3])
if start < 0 then start = learned - base end
if start < 0 then start = 0 end
local count = tonumber(ARGV[2])
local ids = {}
if count > 0 and start < llen then
  ids = redis.call('LRANGE', KEYS[2], start, start + count - 1)
end
local runs = {}
local chunk = 500
for i = 1, #ids, chunk do
  local keys = {}
  for j = i, math.min(i + chunk - 1, #ids) do
    keys[#keys + 1] = ARGV[1] .. ids[j]
  end
  local vals = redis.call('MGET', unpack(keys))
  for j = 1, #vals do runs[#runs + 1] = vals[j] end
end
local state = {}
for i = 3, #KEYS do state[#state + 1] = redis.call('GET', KEYS[i]) end
return {learned, base, version, llen, ids, runs, state}
