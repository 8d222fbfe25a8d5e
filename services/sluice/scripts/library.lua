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
--
-- sluice_enqueue KEYS: the tenant's inbox, bell, high, normal, low, info, job (dedupe),
--                result, the tenant's stats
--                ARGV: field/value pairs of the entry (`priority` picks the lane)
--   The same answers, for a tenant (docs/security.md, "Tenants"): the entry goes into the
--   tenant's inbox as one JSON object, and the bell is rung; a replica moves it into its
--   lane (admit-n.lua). Every key is the tenant's own or read-only to it, and every command
--   runs with the caller's rights, so a tenant cannot use this to touch another's keys.
--   {'queued', 'inbox'} once added. A job larger than the intake decodes is answered here
--   (`input_too_large`, stored as its result) and {'done'} returned.
--@include depth

-- Why a submit is refused, or nil: no such model, an answered id, a queued id, or a full
-- queue (counted in `stats`, where it happens: an exporter sees refusals even of callers it
-- cannot see, in any language, at zero replicas too). `extra`: jobs queued outside the lanes.
local function refusal(info, job, result, lanes, extra, stats)
  if redis.call('EXISTS', info) == 0 then return {'unknown_model'} end
  if redis.call('EXISTS', result) == 1 then return {'done'} end
  local queued = redis.call('GET', job)
  if queued then return {'duplicate', queued} end
  local max = tonumber(redis.call('HGET', info, 'max_queue_depth') or '0')
  if max > 0 then
    local d = extra
    for _, lane in ipairs(lanes) do d = d + depth(lane) end
    if d >= max then
      if stats then redis.call('HINCRBY', stats, 'rejected', 1) end
      return {'rejected', tostring(d), tostring(max)}
    end
  end
  return nil
end

local function submit(keys, args)
  local no = refusal(keys[5], keys[6], keys[7], {keys[2], keys[3], keys[4]}, 0, keys[8])
  if no then return no end
  local entry = redis.call('XADD', keys[1], '*', unpack(args))
  local ttl = tonumber(redis.call('HGET', keys[5], 'result_ttl_s') or '86400')
  redis.call('SET', keys[6], entry, 'EX', ttl)
  return {'queued', entry}
end

local function enqueue(keys, args)
  -- The lanes, and this tenant's own inbox (it may not read the others' lengths).
  local inbox = redis.call('LLEN', keys[1])
  local no = refusal(keys[6], keys[7], keys[8], {keys[3], keys[4], keys[5]}, inbox, keys[9])
  if no then return no end
  local job = {}
  for i = 1, #args, 2 do job[args[i]] = args[i + 1] end
  -- The id is the one the dedupe key names, whatever ARGV says: the two never disagree.
  local tenant = string.match(keys[1], ':inbox:(.*)$')
  local scoped = string.match(keys[7], ':job:(.*)$')
  job['id'] = string.sub(scoped, #tenant + 2)
  local element = cjson.encode(job)
  local ttl = tonumber(redis.call('HGET', keys[6], 'result_ttl_s') or '86400')
  local limit = tonumber(redis.call('HGET', keys[6], 'max_element_bytes') or '0')
  if limit > 0 and #element > limit then
    -- The intake would not decode it, so it could not answer it: answer it here.
    local err = {code = 'input_too_large',
                   message = 'the job is ' .. #element .. ' bytes as JSON, over ' .. limit}
    local result = cjson.encode({id = scoped, model = string.match(keys[6], '{(.*)}'),
                                 status = 'error', error = err})
    redis.call('SET', keys[8], result, 'NX', 'EX', ttl)
    return {'done'}
  end
  redis.call('RPUSH', keys[1], element)
  if redis.call('LLEN', keys[2]) == 0 then redis.call('RPUSH', keys[2], '1') end
  redis.call('SET', keys[7], 'inbox', 'EX', ttl)
  return {'queued', 'inbox'}
end

redis.register_function('sluice_submit', submit)
redis.register_function('sluice_enqueue', enqueue)
redis.register_function{
  function_name = 'sluice_version',
  callback = function() return VERSION end,
  flags = {'no-writes'},
}
