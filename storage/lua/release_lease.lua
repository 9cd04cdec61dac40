-- Release a lease only if we still hold it (our token), so a learner whose
-- lease expired never frees the lease of the learner that took over.
-- KEYS[1] = lease key, ARGV[1] = token. Returns 1 if released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
