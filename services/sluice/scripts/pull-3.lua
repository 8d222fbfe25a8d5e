-- KEYS: the lanes, most urgent first. ARGV: group, consumer, count.
-- One round trip that reads a lane dry before the next: a high-priority job overtakes any
-- normal backlog. Returns {{lane number, entries}, ...}; an empty table when all are empty.
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
