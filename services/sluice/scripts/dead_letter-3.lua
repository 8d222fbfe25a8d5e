-- KEYS: the lane, the dead stream, the job's result key (the dead stream again when the
-- entry has no usable id).
-- ARGV: entry id, group, dead MAXLEN, result JSON or '' (no usable id), result TTL, then the
-- dead letter's field/value pairs (bounded by the caller: queue.bounded_fields).
--
-- Retires one entry with a reason, so that its job ends exactly once:
-- - the job has a final result already (cancelled while it waited, answered by another
--   replica, or dead-lettered by an earlier attempt of this very step): no dead letter;
--   that result is returned, to be pushed;
-- - the entry is no longer pending (acked by someone else): nothing is written;
-- - else the dead letter is added and the `dead_lettered` result stored (unless the result
--   key holds another type, which a producer could write: then the letter alone).
-- An entry with a usable id is not acked here: the writer pushes its result to reply_to, then
-- acks (queue.dead_letter), so a crash in between leaves it pending and its reclaimer pushes
-- the stored result again. An entry with no id (nothing to push) is acked with its letter.
-- The dead letter is written before any ack, so if it fails nothing is acked.
-- Returns {1 if it dead-lettered else 0, the result to push (then ack) or ''}.
local pending = #redis.call('XPENDING', KEYS[1], ARGV[2], ARGV[1], ARGV[1], 1) > 0
local result = ARGV[4]
if result ~= '' then
  local kind = redis.call('TYPE', KEYS[3])['ok']
  if kind ~= 'string' and kind ~= 'none' then
    result = ''  -- a producer put another type at the result key: the letter alone records it
  end
end
if result ~= '' then
  local stored = redis.call('GET', KEYS[3])
  if stored then
    return {0, stored}
  end
end
if not pending then
  return {0, ''}
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 6))
if result == '' then
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
  return {1, ''}
end
redis.call('SET', KEYS[3], ARGV[4], 'NX', 'EX', ARGV[5])
return {1, ARGV[4]}
