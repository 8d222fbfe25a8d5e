-- KEYS: this consumer's heartbeat key (sluice:{M}:alive:<consumer>). ARGV: the TTL in ms.
-- Says this consumer is alive for one TTL more. The key counts the beats of its unbroken run:
-- a lapse (the consumer died, froze, or lost Redis; or Redis itself lost time: a stall, a
-- restart from an older snapshot) expires it, and the count starts again at 1. A reclaimer
-- takes a silent consumer's entries only once its own count shows a whole TTL of beats
-- (reclaim-2.lua): after whatever lapsed the others' heartbeats, they have had that long to
-- beat again. Counted here, in Redis, because expiry runs on Redis's clock, not the replicas'.
-- Returns the count.
local beats = (tonumber(redis.call('GET', KEYS[1])) or 0) + 1
redis.call('SET', KEYS[1], beats, 'PX', ARGV[1])
return beats
