-- KEYS: the bell, the lanes (high, normal, low), the model's info, then one inbox per tenant.
-- ARGV: the most elements to move from one inbox, the largest element (bytes) decoded (when
--       the info hash gives none), the most fields an element may carry, the bytes one call
--       may handle in all (each element costs its size plus ELEMENT_COST), the dead streams'
--       MAXLEN, 1 to clear the bell first (the first pass of a sweep), then the tenants in the
--       order of their inboxes.
--
-- Moves the tenants' submits from their inboxes (lists that only their tenant may push to)
-- into the lanes, as stream entries, in one atomic step: an element leaves its inbox only as
-- an entry, a refusal, or a dead letter, so nothing is lost between the two. What admission
-- does for `sluice_enqueue`, it does here again for every element, since a tenant may push
-- to its inbox directly:
--   * the queue bound: no more is moved while the lanes hold `max_queue_depth` jobs not yet
--     acked (the rest waits in its inbox; `full` says so);
--   * dedupe: an id moved already and not yet answered is dropped (the one queued entry
--     answers it); a moved id's dedupe record then holds its entry id, as sluice_submit's. An
--     id answered already (cancelled first, say) is moved all the same, so that the replica
--     pushes that answer to the element's reply_to without running it;
--   * the id is scoped here (`<tenant>:<id>`) and `sluice.tenant` set here, whatever the
--     element says, so a tenant can only ever name jobs of its own.
-- An element with a valid id but a bad field (`input` or `params` not JSON text, too many
-- fields) is moved with a `sluice.poison` field: the replica answers it `invalid_input`. One with no
-- valid id, not a JSON object, or over the size limit (not decoded at all) cannot be answered:
-- it becomes a dead letter on the tenant's own dead stream, `sluice:{M}:dead:<tenant>`, so one
-- tenant's poison never pushes another's letters out. A call handles at most its budget (bytes,
-- and a fixed cost per element), so its cost is bounded whatever the tenants push.
-- An element is read (LINDEX) and popped only once it has become an entry, a drop or a dead
-- letter: a write that fails (a lane whose ids are exhausted, say) leaves it in its inbox.
--
-- Returns {moved, inboxes still holding elements, inboxes refused (not lists), dropped as
-- answered or queued already, dead letters, full (1: the queue bound stopped the move)}.
-- The bell is cleared at the start of a sweep, before any inbox is read: a submit that rings
-- it later wakes the next sweep, so no ring is ever lost to a sweep that had passed its inbox.
--@include depth

local ELEMENT_COST = 1024  -- budget bytes per element, whatever its size: bounds the count
local per_inbox = tonumber(ARGV[1])
local max_bytes = tonumber(redis.call('HGET', KEYS[5], 'max_element_bytes') or ARGV[2])
local max_fields = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local dead_maxlen = ARGV[5]
if ARGV[6] == '1' then
  redis.call('LTRIM', KEYS[1], 1, 0)  -- empties it (the worker may not DEL)
end
local LANES = {high = 2, normal = 3, low = 4}
local prefix = string.sub(KEYS[1], 1, -5)  -- 'sluice:{M}:' (KEYS[1] is 'sluice:{M}:bell')

-- A lane of another type would fail the XADD after the LPOP, and lose what was popped.
for lane = 2, 4 do
  local t = redis.call('TYPE', KEYS[lane])['ok']
  if t ~= 'stream' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE lane ' .. KEYS[lane] .. ' is a ' .. t)
  end
end

local max = tonumber(redis.call('HGET', KEYS[5], 'max_queue_depth') or '0')
local ttl = tonumber(redis.call('HGET', KEYS[5], 'result_ttl_s') or '86400')
local room = math.huge
if max > 0 then room = max - depth(KEYS[2]) - depth(KEYS[3]) - depth(KEYS[4]) end

-- A field's value as the lanes carry it: text. Objects are not re-encoded (cjson would round
-- floats and turn [] into {}): `input` and `params` must be JSON text, as on a stream.
local function text(value)
  local kind = type(value)
  if kind == 'string' then return value end
  if kind == 'number' and value == math.floor(value) and math.abs(value) < 2 ^ 53 then
    return string.format('%.0f', value)
  end
  if kind == 'boolean' then return tostring(value) end
  return nil, kind
end

local function letter(tenant, element, why)
  redis.call('XADD', prefix .. 'dead:' .. tenant, 'MAXLEN', '~', dead_maxlen, '*',
             'sluice.tenant', tenant, 'reason', 'inbox element refused: ' .. why,
             'raw', string.sub(element, 1, 1024))
  return 'dead'
end

-- The fields of a decoded element, and what is wrong with them (nil: nothing).
local function fields_of(job, scoped, tenant)
  local fields = {'id', scoped, 'sluice.tenant', tenant}
  for name, value in pairs(job) do
    if type(name) == 'string' and name ~= 'id' and name ~= 'priority'
        and string.sub(name, 1, 7) ~= 'sluice.' then
      if #fields >= 2 * max_fields then
        return fields, 'over ' .. max_fields .. ' fields'
      end
      local v, kind = text(value)
      if v then
        fields[#fields + 1] = name
        fields[#fields + 1] = v
      elseif kind ~= 'userdata' then  -- JSON null: left out
        return fields, '`' .. string.sub(name, 1, 64) .. '` must be a string (JSON text), not a ' .. kind
      end
    end
  end
  return fields, nil
end

local function move(tenant, element)
  if #element > max_bytes then return letter(tenant, element, 'over ' .. max_bytes .. ' bytes') end
  local ok, job = pcall(cjson.decode, element)
  if not ok or type(job) ~= 'table' then return letter(tenant, element, 'not a JSON object') end
  local id = job['id']
  if type(id) ~= 'string' or #tenant + 1 + #id > 128
      or not string.match(id, '^[A-Za-z0-9._:-]+$') then
    return letter(tenant, element, 'no valid string `id`')
  end
  local scoped = tenant .. ':' .. id
  local record = prefix .. 'job:' .. scoped
  -- Answered already (a cancel that came first, a resubmit): moved all the same, so that the
  -- replica pushes that answer to the element's reply_to (at once, never run). Queued already
  -- and not answered: dropped, since the one queued entry answers the id.
  local answered = redis.call('EXISTS', prefix .. 'result:' .. scoped) == 1
  local queued = redis.call('GET', record)
  if not answered and queued and queued ~= 'inbox' then return 'dropped' end
  local fields, problem = fields_of(job, scoped, tenant)
  if problem then
    -- Answered `invalid_input`, and told where it asked to be (the replica checks the name).
    fields = {'id', scoped, 'sluice.tenant', tenant, 'sluice.poison', problem}
    if type(job['reply_to']) == 'string' then
      fields[#fields + 1] = 'reply_to'
      fields[#fields + 1] = job['reply_to']
    end
  end
  local entry = redis.call('XADD', KEYS[LANES[job['priority']] or 3], '*', unpack(fields))
  if not answered then redis.call('SET', record, entry, 'EX', ttl) end
  return 'moved'
end

local counts = {moved = 0, dropped = 0, dead = 0}
local left, refused = 0, 0
for i = 6, #KEYS do
  local tenant = ARGV[i + 1]
  local taken = 0
  while taken < per_inbox and room > 0 and budget > 0 do
    local element = redis.pcall('LINDEX', KEYS[i], 0)
    if type(element) == 'table' and element['err'] then
      refused = refused + 1
      break
    end
    if not element then break end
    budget = budget - #element - ELEMENT_COST
    local what = move(tenant, element)
    redis.call('LPOP', KEYS[i])  -- only now: it is an entry, a drop or a dead letter
    counts[what] = counts[what] + 1
    if what == 'moved' then room = room - 1 end
    taken = taken + 1
  end
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t == 'list' and redis.call('LLEN', KEYS[i]) > 0 then left = left + 1 end
end
local full = 0
if room <= 0 and left > 0 then full = 1 end
return {counts['moved'], left, refused, counts['dropped'], counts['dead'], full}
