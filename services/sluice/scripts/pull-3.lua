-- KEYS: the lanes, most urgent first. ARGV: group, consumer, count.
-- One round trip that reads a lane dry before the next: a high-priority job overtakes any
-- normal backlog. Returns {{lane number, entries}, ...}; an empty table when all are empty.
-- A lane whose group is missing (its key deleted, or Redis restarted empty) is skipped and
-- reported as {-1, lane number}: the entries already read from other lanes are delivered now
-- and must reach the caller, not be left pending by an error half-way.
local out = {}
local left = tonumber(ARGV[3])
for lane, key in ipairs(KEYS) do
  if left <= 0 then break end
  local reply = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
                            'STREAMS', key, '>')
  if type(reply) == 'table' and reply['err'] then
    out[#out + 1] = {-1, lane - 1}
  elseif reply then
    local entries = reply[1][2]
    out[#out + 1] = {lane - 1, entries}
    left = left - #entries
  end
end
return out
