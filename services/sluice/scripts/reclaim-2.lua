-- KEYS: one lane, the model's dead stream.
-- ARGV: group, consumer, min idle ms, cursor ('-' to start), count, dead MAXLEN, lane name,
-- the prefix of the model's heartbeat keys (sluice:{M}:alive:), the heartbeat TTL in ms ('0':
-- take no silent consumer's entries), the longest gap in ms between two beats of one run
-- (heartbeat-1.lua), and the mark that ends the names of consumers that beat.
-- Takes over up to `count` entries whose owner is gone:
-- - idle past the visibility timeout: it stopped renewing its lease (it died, or froze);
-- - held by a consumer that beats (its name ends with the mark) and whose heartbeat key has
--   expired: it died (killed, its node lost) or was silent a whole heartbeat TTL, so its jobs
--   need not wait out the timeout. Only while this consumer's own heartbeat run
--   (heartbeat-1.lua) is a whole TTL long, in Redis's time, and its last beat no older than
--   the longest gap: after whatever lapsed every heartbeat (Redis stalled, or restarted from
--   an older snapshot), the live replicas have had that long to beat again. A consumer without the mark (a replica of an
--   earlier release, which sets no heartbeat while it pulls) keeps the first rule only.
-- It reads at most 10 x count rows of the pending list, from the cursor on, so a pass costs
-- O(count) however long the pending list is (as XAUTOCLAIM does); a live replica's entries
-- (renewed, heartbeat alive) are never touched.
-- A stale entry that was deleted from the lane while pending (a trim, an XDEL), idle past the
-- visibility timeout and whose owner's heartbeat key has expired too, cannot be claimed: it is
-- recorded here, in the same step, as a dead letter with reason `deleted_while_pending` (entry
-- id, lane, deliveries, last owner) and acked off the pending list, so none vanishes
-- unrecorded. (XAUTOCLAIM and XCLAIM would drop it silently, and XAUTOCLAIM even those of live
-- owners.) Silence alone is not enough here: a replica whose link stalled for a while still
-- answers that job by id, and the job would end twice. If the dead stream refuses the letter,
-- the entry stays pending, to be recorded on a later pass.
-- Returns {next cursor ('-' once the list was read to its end), {{id, fields, deliveries},
-- ...}, {deleted entry id, ...}}.
local count = tonumber(ARGV[5])
local min_idle = tonumber(ARGV[3])
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], '+', count * 10)
local cursor = '-'
if #rows == count * 10 then cursor = '(' .. rows[#rows][1] end
-- A live replica stops renewing an entry deleted under it (XCLAIM would drop it) but keeps its
-- heartbeat key alive (heartbeat-1.lua; an earlier release's replica, as it renews), and still
-- answers that job by id: its entry is left alone. Asked once per owner a pass: a page holds
-- many rows of few owners.
local gone = {}
local function owner_gone(owner)
  if gone[owner] == nil then
    gone[owner] = redis.call('EXISTS', ARGV[8] .. owner) == 0
  end
  return gone[owner]
end
local ttl, max_gap, mark = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]
local mine = ARGV[8] .. ARGV[2]
local left = redis.call('PTTL', mine)
local take_silent = ttl > 0 and left > 0 and ttl - left <= max_gap
  and (tonumber(redis.call('GET', mine)) or 0) >= ttl
local function beats(owner)
  return owner:sub(-#mark) == mark
end
local stale, deliveries, deleted = {}, {}, {}
for _, row in ipairs(rows) do
  local id, owner, idle, times = row[1], row[2], row[3], row[4]
  local expired = idle >= min_idle
  local silent = take_silent and owner ~= ARGV[2] and beats(owner) and owner_gone(owner)
  if expired or silent then
    if #redis.call('XRANGE', KEYS[1], id, id) > 0 then
      stale[#stale + 1] = id
      deliveries[id] = times + 1  -- XCLAIM counts this delivery
      if #stale >= count then
        cursor = '(' .. id
        break
      end
    elseif expired and owner_gone(owner) then
      local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
        'reason', 'deleted_while_pending', 'entry_id', id, 'lane', ARGV[7],
        'deliveries', tostring(times), 'consumer', owner)
      if type(added) ~= 'table' or not added['err'] then
        redis.call('XACK', KEYS[1], ARGV[1], id)
        deleted[#deleted + 1] = id
      end
    end
  end
end
local claimed = {}
if #stale > 0 then
  -- Min idle 0: what was checked above still holds, the script being one atomic step (no
  -- other reclaimer, nor a renewal, can come between), and a silent owner's rows may be young.
  local args = {KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(stale) do args[#args + 1] = id end
  for _, entry in ipairs(redis.call('XCLAIM', unpack(args))) do
    claimed[#claimed + 1] = {entry[1], entry[2], deliveries[entry[1]]}
  end
end
return {cursor, claimed, deleted}
