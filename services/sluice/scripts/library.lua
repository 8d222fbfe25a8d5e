-- The producer side, as a Redis Function library: any language calls it with FCALL, once a
-- replica (or `sluice up`) has loaded it. Documented in docs/protocol.md ("Submitting with
-- admission").
--
-- sluice_submit  KEYS: target lane, high, normal, low, info, job (dedupe), result, stats
--                ARGV: field/value pairs of the entry, as for XADD
--                (stats may be left out: a caller that passes library v1's seven keys still
--                submits, and only its rejections go uncounted)
--   -> {'queued', entry id}   added
--      {'duplicate', entry id} the id is queued already: nothing added
--      {'done'}               the id has a final result already: nothing added
--      {'rejected', depth, max} the model's queue is full: nothing added
--      {'unknown_model'}      no model of that name is registered
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
