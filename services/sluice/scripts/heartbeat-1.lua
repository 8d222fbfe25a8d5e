-- KEYS: this consumer's heartbeat key (sluice:{M}:alive:<consumer>).
-- ARGV: the TTL in ms, the longest gap in ms between two beats of one unbroken run.
-- Says this consumer is alive for one TTL more. The key holds how long, in ms of Redis's own
-- time, its unbroken run of beats has lasted: each beat adds the time since the last one
-- (the TTL less what was left of it), and a beat after a longer gap, or after the key
-- lapsed, starts a run again at 0. So a burst of beats adds nothing, and time Redis lost (a
-- stall, a restart from an older snapshot or AOF, a failover) breaks every run it touched,
-- the reclaimer's own included. A reclaimer takes a silent consumer's entries only while its
-- own run is a whole TTL long and its last beat recent (reclaim-2.lua): after whatever lapsed
-- the others' heartbeats, they have had that long to beat again.
-- Returns the run's length in ms.
local ttl, max_gap = tonumber(ARGV[1]), tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[1])
local run = 0
if left > 0 and ttl - left <= max_gap then
  run = (tonumber(redis.call('GET', KEYS[1])) or 0) + (ttl - left)
end
redis.call('SET', KEYS[1], run, 'PX', ttl)
return run
