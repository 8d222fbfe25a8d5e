"""Server-side scripts: the steps that must be atomic on Redis, or must not touch the wrong key.

Each script names every key it touches in KEYS, and a model's keys share the `{M}` hash tag, so
all of them run on Redis Cluster too (the reply stream is a script of its own, in its own slot).
"""

from __future__ import annotations

# KEYS: reply stream. ARGV: result JSON, MAXLEN, TTL.
# Touches nothing that is not a stream: a `reply_to` naming a result or a string stays as it was.
PUSH_REPLY = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'result', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: jobs stream, dead stream, result key (any key of the slot when there is no result).
# ARGV: entry id, group, dead MAXLEN, result JSON or '', result TTL, then field/value pairs.
# Returns 0 when the entry is no longer pending (answered or dead-lettered already: a retry
# after a lost reply, or a slow replica that finished after all), 2 when it stored the result,
# 1 otherwise. The dead letter is written before the ack, so if it fails nothing is acked.
DEAD_LETTER = """
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
"""
