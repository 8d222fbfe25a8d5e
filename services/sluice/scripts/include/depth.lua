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
