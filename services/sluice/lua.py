"""Server-side scripts: the steps that must be atomic on Redis, or must not touch the wrong key.

Each script names every key it touches in KEYS, and a model's keys share the `{M}` hash tag, so
all of them run on Redis Cluster too (the reply stream is a script of its own, in its own slot).
"""

from __future__ import annotations

# KEYS: reply stream. ARGV: result JSON, MAXLEN, TTL, and '' or a stream id to look back from.
# Touches nothing that is not a stream: a `reply_to` naming a result or a string stays as it was.
# With a look-back id (a write retried after Redis failed mid-way, when an earlier attempt may
# have pushed already), it pushes only if no entry since then carries this very result: 2 if
# one does. The scan goes in pages, so a busy stream never loads whole into the script.
PUSH_REPLY = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return 0
end
if ARGV[4] ~= '' and kind == 'stream' then
  local from = ARGV[4]
  while true do
    local page = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 100)
    for _, entry in ipairs(page) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'result' and fields[i + 1] == ARGV[1] then return 2 end
      end
    end
    if #page < 100 then break end
    from = '(' .. page[#page][1]
  end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'result', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: the reply stream. ARGV: job id, seq, text delta, attempt, MAXLEN, TTL.
# Appends one streamed text delta (generation); returns 0, pushing nothing, when the key holds
# something other than a stream. Deltas are progress, not results: no look-back dedupe.
PUSH_TOKEN = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'id', ARGV[1], 'seq', ARGV[2], 'token', ARGV[3], 'attempt', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
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

# KEYS: the lanes, most urgent first, then each outcome's result key.
# ARGV: group, result TTL, then for each outcome its lane number (0 = first key), entry id and
# result JSON. Stores each result once (SET NX) and acks its entry, all at once: what
# queue.finish does in a MULTI on one server. On a cluster redis-py runs every command queued
# on a MULTI in a thread of its own, blocking the event loop for tens of ms a batch; a script
# is one EVALSHA, as atomic. Returns {stored (1 or 0), acked (0 or 1)} for each, flattened.
FINISH = """
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
"""

# KEYS: the lanes, most urgent first. ARGV: group, consumer, count.
# One round trip that reads a lane dry before the next: a high-priority job overtakes any
# normal backlog. Returns {{lane number, entries}, ...}; an empty table when all are empty.
PULL = """
local out = {}
local left = tonumber(ARGV[3])
for lane, key in ipairs(KEYS) do
  if left <= 0 then break end
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
                           'STREAMS', key, '>')
  if reply then
    local entries = reply[1][2]
    out[#out + 1] = {lane - 1, entries}
    left = left - #entries
  end
end
return out
"""

# Stream ids compare as two numbers, never as strings ("9-0" < "10-0").
_ID_LT = """
local function id_lt(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
"""

# KEYS: one lane's stream. Trims every entry below the oldest one some group still needs:
# the oldest pending entry (delivered, not acked) or, with none, the first undelivered one.
# Redis 7.0 has no ACKED trim option, and MAXLEN would drop unacked entries: this never
# does, whatever the groups' state. Returns how many entries it removed.
TRIM = (
    _ID_LT
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local floor = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  -- Everything after last-delivered-id is undelivered: keep it (MINID keeps the id itself).
  local keep = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], info['name'])[2]
    if id_lt(oldest, keep) then keep = oldest end
  end
  if floor == nil or id_lt(keep, floor) then floor = keep end
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""
)

#: Bumped whenever LIBRARY changes, so replicas replace an older library they find.
LIBRARY_VERSION = "2"

# The producer side, as a Redis Function library: any language calls it with FCALL, once a
# replica (or `sluice up`) has loaded it. Documented in docs/protocol.md ("Submitting with
# admission").
#
# sluice_submit  KEYS: target lane, high, normal, low, info, job (dedupe), result, stats
#                ARGV: field/value pairs of the entry, as for XADD
#                (stats may be left out: a caller that passes library v1's seven keys still
#                submits, and only its rejections go uncounted)
#   -> {'queued', entry id}   added
#      {'duplicate', entry id} the id is queued already: nothing added
#      {'done'}               the id has a final result already: nothing added
#      {'rejected', depth, max} the model's queue is full: nothing added
#      {'unknown_model'}      no model of that name is registered
LIBRARY = (
    f"#!lua name=sluice\nlocal VERSION = '{LIBRARY_VERSION}'\n"
    + """
-- Jobs that entered and are not yet acked: undelivered (the group's lag) plus pending.
local function depth(key)
  if redis.call('EXISTS', key) == 0 then return 0 end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == 'workers' then
      local lag = info['lag']
      -- Redis cannot always tell the lag (after XDEL): then count every entry, to be safe.
      if not lag then lag = redis.call('XLEN', key) end
      return tonumber(lag) + tonumber(info['pending'])
    end
  end
  return redis.call('XLEN', key)  -- no replica has read this lane yet
end

local function submit(keys, args)
  if redis.call('EXISTS', keys[5]) == 0 then return {'unknown_model'} end
  if redis.call('EXISTS', keys[7]) == 1 then return {'done'} end
  local queued = redis.call('GET', keys[6])
  if queued then return {'duplicate', queued} end
  local max = tonumber(redis.call('HGET', keys[5], 'max_queue_depth') or '0')
  if max > 0 then
    local d = depth(keys[2]) + depth(keys[3]) + depth(keys[4])
    if d >= max then
      -- Counted here, where it happens: an exporter sees refusals even of callers it
      -- cannot see (any language, any process), at zero replicas too.
      if keys[8] then redis.call('HINCRBY', keys[8], 'rejected', 1) end
      return {'rejected', tostring(d), tostring(max)}
    end
  end
  local entry = redis.call('XADD', keys[1], '*', unpack(args))
  local ttl = tonumber(redis.call('HGET', keys[5], 'result_ttl_s') or '86400')
  redis.call('SET', keys[6], entry, 'EX', ttl)
  return {'queued', entry}
end

redis.register_function('sluice_submit', submit)
redis.register_function{
  function_name = 'sluice_version',
  callback = function() return VERSION end,
  flags = {'no-writes'},
}
"""
)

# KEYS: dead stream, the lane to queue on, result key, job (dedupe) key.
# ARGV: dead entry id, then the field/value pairs to queue.
# Puts one dead letter back on its lane, atomically: the new entry is added, the job's
# `dead_lettered` result and dedupe record removed (so the replay can be answered), and the
# dead letter deleted. Returns {'replayed', new id}, {'missing'} when the dead letter is gone
# (replayed or purged already), or {'answered', status} when the job has another final result.
REPLAY = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return {'missing'} end
local stored = redis.call('GET', KEYS[3])
if stored then
  local ok, result = pcall(cjson.decode, stored)
  local code = ok and type(result) == 'table' and type(result['error']) == 'table'
    and result['error']['code']
  if code ~= 'dead_lettered' then
    return {'answered', ok and type(result) == 'table' and tostring(result['status']) or '?'}
  end
  redis.call('DEL', KEYS[3])
end
redis.call('DEL', KEYS[4])
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return {'replayed', id}
"""
