-- KEYS: one lane's stream. Trims every entry below the oldest one some group still needs:
-- the oldest pending entry (delivered, not acked) or, with none, the first undelivered one.
-- Redis 7.0 has no ACKED trim option, and MAXLEN would drop unacked entries: this never
-- does, whatever the groups' state. Returns how many entries it removed.
--@include id_lt
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
