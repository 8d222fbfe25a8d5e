-- KEYS: one lane, the model's dead stream.
-- ARGV: group, consumer, min idle ms, cursor, count, dead MAXLEN, lane name.
-- Claims up to `count` entries whose owner stopped renewing its lease (idle past the
-- visibility timeout), with XAUTOCLAIM: it scans at most 10 x count pending entries from the
-- cursor, so a call costs O(count) however long the pending list is.
-- Entries deleted while pending (a trim, an XDEL) come back from XAUTOCLAIM as ids only, and
-- it drops them from the pending list: each one is recorded here, in the same step, as a
-- dead letter with reason `deleted_while_pending`, so none vanishes unrecorded.
-- Returns {next cursor, {{entry id, fields, deliveries}, ...}, {deleted entry id, ...}}.
-- A dead stream that is not a stream would fail the XADDs below after XAUTOCLAIM had dropped
-- the deleted ids: refuse before claiming anything.
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE the dead stream ' .. KEYS[2] .. ' is not a stream')
end
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                         'COUNT', ARGV[5])
local claimed = {}
for _, entry in ipairs(reply[2]) do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)[1]
  claimed[#claimed + 1] = {entry[1], entry[2], row and row[4] or 1}
end
for _, id in ipairs(reply[3]) do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'reason', 'deleted_while_pending',
             'entry_id', id, 'lane', ARGV[7], 'deliveries', '0')
end
return {reply[1], claimed, reply[3]}
