-- KEYS: the reply stream. ARGV: job id, seq, text delta, attempt, MAXLEN, TTL.
-- Appends one streamed text delta (generation); returns 0, pushing nothing, when the key holds
-- something other than a stream. Deltas are progress, not results: no look-back dedupe.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'id', ARGV[1], 'seq', ARGV[2], 'token', ARGV[3], 'attempt', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
