-- KEYS: the reply stream. ARGV: job id, result JSON, MAXLEN, TTL.
-- Appends one final result to a caller's reply stream, as fields `id` and `result`, and
-- refreshes the stream's TTL. Touches nothing that is not a stream: a `reply_to` naming a
-- string or a hash stays as it was (returns 0). Returns 1 when it pushed.
--
-- Pushes are at-least-once: a retried write, a duplicate run or a resubmitted id may push
-- the same result again, and readers drop repeats by `id` (the result key is the one source
-- of truth). There is deliberately no look for an earlier push: any such search costs more
-- as the stream grows, and a busy reply stream would turn every retry into a stall.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[1], 'result', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
