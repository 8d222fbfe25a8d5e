-- KEYS: jobs stream, dead stream, result key (any key of the slot when there is no result).
-- ARGV: entry id, group, dead MAXLEN, result JSON or '', result TTL, then field/value pairs.
-- Returns 0 when the entry is no longer pending (answered or dead-lettered already: a retry
-- after a lost reply, or a slow replica that finished after all), 2 when it stored the result,
-- 1 otherwise. The dead letter is written before the ack, so if it fails nothing is acked.
local pending = redis.call('XPENDING', KEYS[1], ARGV[2], ARGV[1], ARGV[1], 1)
if #pending == 0 then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 6))
local stored = 1
if ARGV[4] ~= '' and redis.call('SET', KEYS[3], ARGV[4], 'NX', 'EX', ARGV[5]) then
  stored = 2
end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
return stored
