-- KEYS: each outcome's result key. ARGV: result TTL, then each outcome's result JSON.
-- Stores each result once (SET NX: the first writer wins) and answers, for each:
--   0           this result was stored;
--   the result  one was stored already: that one is the job's answer, and the one the writer
--               pushes to reply_to;
--   -1          the key holds something that is not a string (a producer wrote a stream or a
--               hash there): no result can ever be stored, and the writer dead-letters the
--               job instead. Checked first, so one such key cannot fail the whole batch.
-- O(batch); one EVALSHA instead of a MULTI (on a cluster, redis-py runs every command queued
-- on a MULTI in a thread of its own, blocking the event loop for tens of ms a batch).
-- Nothing is acked here: the writer pushes the replies, then acks (queue.finish), so a crash
-- between the two leaves the entry pending, and whoever reclaims it finds the stored result
-- and pushes it again. An entry is acked only once its reply is pushed.
local out = {}
for i = 1, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'string' and kind ~= 'none' then
    out[i] = -1
  else
    out[i] = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'EX', ARGV[1], 'GET') or 0
  end
end
return out
