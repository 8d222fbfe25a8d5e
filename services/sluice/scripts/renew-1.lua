-- KEYS: one lane.
-- ARGV: group, consumer, retry count or '', then entry ids.
-- Renews this consumer's lease on entries it still holds (pulled, waiting for the model,
-- running, or waiting to be written): XCLAIM ... JUSTID with min-idle 0 resets their idle
-- time without counting a delivery, so reclaimers (past the visibility timeout) only ever
-- take the entries of a replica that stopped renewing. With a retry count, the entries'
-- delivery count is set to it (a retry counts its run in Redis, so a crash during the backoff
-- cannot reset it).
-- Only entries still pending on this very consumer are renewed: one another consumer took
-- over (this replica was frozen past the timeout, or silent past its heartbeat TTL) is never
-- taken back.
-- An entry deleted from the lane while pending is not renewed (XCLAIM would drop it from the
-- pending list, and with it any record): the replica still answers its job by id, and if it
-- dies first, a reclaimer records it (reclaim-2.lua). (The heartbeat is heartbeat-1.lua's.)
-- Returns {ids no longer pending (acked), ids now held by another consumer, ids deleted}.
local mine, gone, taken, deleted = {}, {}, {}, {}
for i = 4, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if not row then
    gone[#gone + 1] = ARGV[i]
  elseif row[2] ~= ARGV[2] then
    taken[#taken + 1] = ARGV[i]
  elseif #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) == 0 then
    deleted[#deleted + 1] = ARGV[i]
  else
    mine[#mine + 1] = ARGV[i]
  end
end
if #mine > 0 then
  local args = {KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(mine) do args[#args + 1] = id end
  if ARGV[3] ~= '' then
    args[#args + 1] = 'RETRYCOUNT'
    args[#args + 1] = ARGV[3]
  end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return {gone, taken, deleted}
