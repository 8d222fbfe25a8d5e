-- KEYS: the lane, the dead stream, the job's result key (the dead stream again when the
-- entry has no usable id).
-- ARGV: entry id, group, dead MAXLEN, result JSON or '' (no usable id), result TTL, then the
-- dead letter's field/value pairs (bounded by the caller: queue.bounded_fields).
--
-- Retires one entry with a reason, so that its job ends exactly once:
-- - the job has a final result already (cancelled while it waited, or answered by another
--   replica): no dead letter; the entry is acked and that result is returned, to be pushed;
-- - the entry is no longer pending (this very step retried after a lost reply, or acked by
--   someone else): nothing is written;
-- - else the dead letter is added, the `dead_lettered` result stored, and the entry acked.
-- The dead letter is written before the ack, so if it fails nothing is acked.
-- Returns {1 if it dead-lettered else 0, the result to push to reply_to or ''}.
local pending = #redis.call('XPENDING', KEYS[1], ARGV[2], ARGV[1], ARGV[1], 1) > 0
if ARGV[4] ~= '' then
  local stored = redis.call('GET', KEYS[3])
  if stored then
    if pending then redis.call('XACK', KEYS[1], ARGV[2], ARGV[1]) end
    return {0, stored}
  end
end
if not pending then
  return {0, ''}
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 6))
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[3], ARGV[4], 'NX', 'EX', ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
return {1, ARGV[4]}
