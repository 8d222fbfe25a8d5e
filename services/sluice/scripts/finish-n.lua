-- KEYS: the lanes, most urgent first, then each outcome's result key.
-- ARGV: group, result TTL, then for each outcome its lane number (0 = first key), entry id and
-- result JSON. Stores each result once (SET NX) and acks its entry, all at once: what
-- queue.finish does in a MULTI on one server. On a cluster redis-py runs every command queued
-- on a MULTI in a thread of its own, blocking the event loop for tens of ms a batch; a script
-- is one EVALSHA, as atomic. Returns {stored (1 or 0), acked (0 or 1)} for each, flattened.
local n = (#ARGV - 2) / 3
local first_result = #KEYS - n
local out = {}
for i = 1, n do
  local lane = tonumber(ARGV[3 * i]) + 1
  local stored = redis.call('SET', KEYS[first_result + i], ARGV[3 * i + 2], 'NX', 'EX', ARGV[2])
  out[#out + 1] = stored and 1 or 0
  out[#out + 1] = redis.call('XACK', KEYS[lane], ARGV[1], ARGV[3 * i + 1])
end
return out
