-- Append dead letters to the capped list, counting what goes in and out.
-- KEYS[1] = dead-letter list, KEYS[2] = counters hash.
-- ARGV[1] = cap (most entries kept), ARGV[2..] = entries.
-- The list is capped so that no stream of bad input can fill a `noeviction`
-- Redis: the oldest entries are trimmed, and counted in `dead_letters_trimmed`
-- so an operator can tell that some were lost. Returns how many were trimmed.
local cap = tonumber(ARGV[1])
local len = 0
for i = 2, #ARGV do len = redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('HINCRBY', KEYS[2], 'dead_letters', #ARGV - 1)
local over = len - cap
if over > 0 then
  redis.call('LTRIM', KEYS[1], over, -1)
  redis.call('HINCRBY', KEYS[2], 'dead_letters_trimmed', over)
  return over
end
return 0
