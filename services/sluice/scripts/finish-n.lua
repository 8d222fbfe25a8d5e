-- KEYS: the lanes, most urgent first, then each outcome's result key.
-- ARGV: group, result TTL, then for each outcome its lane number (0 = first key), entry id
-- and result JSON.
-- Stores each result once (SET NX: the first writer wins) and acks its entry, all at once:
-- what queue.finish does in a MULTI on one server. On a cluster redis-py runs every command
-- queued on a MULTI in a thread of its own, blocking the event loop for tens of ms a batch; a
-- script is one EVALSHA, as atomic.
-- Returns, for each outcome, 0 when this result was stored, else the result already stored
-- (the one to push to reply_to): O(batch), like the MULTI's SET NX GET.
local n = (#ARGV - 2) / 3
local first_result = #KEYS - n
local out = {}
for i = 1, n do
  local lane = tonumber(ARGV[3 * i]) + 1
  local before = redis.call('SET', KEYS[first_result + i], ARGV[3 * i + 2], 'NX', 'EX',
                            ARGV[2], 'GET')
  out[#out + 1] = before or 0
  redis.call('XACK', KEYS[lane], ARGV[1], ARGV[3 * i + 1])
end
return out
