-- KEYS: the bell, the lanes (high, normal, low), then one inbox per tenant.
-- ARGV: how many elements to move from each inbox, the largest element (bytes) decoded,
--       the most fields an element may carry, then the tenants in the order of their inboxes.
--
-- Moves the tenants' submits from their inboxes (lists that only their tenant may push to)
-- into the lanes, as stream entries, in one atomic step: an element leaves its inbox only by
-- becoming an entry, so nothing is lost between the two. Its id is scoped here
-- (`<tenant>:<id>`) and `tenant` set here, whatever the element says, so a tenant can only
-- ever name jobs of its own. An element that is not a JSON object with a string `id` (or is
-- over the size or field limit, then not decoded at all) becomes an id-less entry carrying
-- its first KiB, which the replica dead-letters: a poison element never stops the intake.
--
-- Returns {moved, inboxes still holding elements, inboxes refused (not a list)}. The bell
-- is cleared when every inbox is empty and rung again otherwise, so that the next BLPOP
-- wakes for what is left.
local LANES = {high = 2, normal = 3, low = 4}
local per_inbox = tonumber(ARGV[1])
local max_bytes = tonumber(ARGV[2])
local max_fields = tonumber(ARGV[3])

-- A lane of another type would fail the XADD after the LPOP, and lose what was popped.
for lane = 2, 4 do
  local t = redis.call('TYPE', KEYS[lane])['ok']
  if t ~= 'stream' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE lane ' .. KEYS[lane] .. ' is a ' .. t)
  end
end

-- A field's value as the lanes carry it: text. Nested JSON is re-encoded, so an element may
-- give `input` either as an object or as the JSON text a stream entry would carry.
local function text(value)
  local kind = type(value)
  if kind == 'string' then return value end
  if kind == 'number' then
    if value == math.floor(value) and math.abs(value) < 2 ^ 53 then
      return string.format('%.0f', value)
    end
    return string.format('%.17g', value)
  end
  if kind == 'boolean' then return tostring(value) end
  if kind == 'table' then
    local ok, encoded = pcall(cjson.encode, value)
    if ok then return encoded end
  end
  return nil  -- JSON null, or what cannot be encoded: left out
end

local function poison(tenant, element, why)
  return {'tenant', tenant, 'poison', why, 'raw', string.sub(element, 1, 1024)}, KEYS[3]
end

local function entry(tenant, element)
  if #element > max_bytes then
    return poison(tenant, element, 'over ' .. max_bytes .. ' bytes')
  end
  local ok, job = pcall(cjson.decode, element)
  if not ok or type(job) ~= 'table' then
    return poison(tenant, element, 'not a JSON object')
  end
  if type(job['id']) ~= 'string' then
    return poison(tenant, element, 'no string `id`')
  end
  local fields = {'id', tenant .. ':' .. job['id'], 'tenant', tenant}
  for name, value in pairs(job) do
    if type(name) == 'string' and name ~= 'id' and name ~= 'tenant' and name ~= 'priority' then
      if #fields >= 2 * max_fields then
        return poison(tenant, element, 'over ' .. max_fields .. ' fields')
      end
      local v = text(value)
      if v then
        fields[#fields + 1] = name
        fields[#fields + 1] = v
      end
    end
  end
  return fields, KEYS[LANES[job['priority']] or 3]
end

local moved, left, refused = 0, 0, 0
for i = 5, #KEYS do
  local tenant = ARGV[i - 1]
  local popped = redis.pcall('LPOP', KEYS[i], per_inbox)
  if type(popped) == 'table' and popped['err'] then
    refused = refused + 1
  elseif popped then
    for _, element in ipairs(popped) do
      local fields, lane = entry(tenant, element)
      redis.call('XADD', lane, '*', unpack(fields))
      moved = moved + 1
    end
    if redis.call('LLEN', KEYS[i]) > 0 then left = left + 1 end
  end
end
if left == 0 then
  redis.call('LTRIM', KEYS[1], 1, 0)  -- empties it (the worker may not DEL)
elseif redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('RPUSH', KEYS[1], '1')
end
return {moved, left, refused}
