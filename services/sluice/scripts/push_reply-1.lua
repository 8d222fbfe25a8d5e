-- KEYS: reply stream. ARGV: result JSON, MAXLEN, TTL, and '' or a stream id to look back from.
-- Touches nothing that is not a stream: a `reply_to` naming a result or a string stays as it was.
-- With a look-back id (a write retried after Redis failed mid-way, when an earlier attempt may
-- have pushed already), it pushes only if no entry since then carries this very result: 2 if
-- one does. The scan goes in pages, so a busy stream never loads whole into the script.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return 0
end
if ARGV[4] ~= '' and kind == 'stream' then
  local from = ARGV[4]
  while true do
    local page = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 100)
    for _, entry in ipairs(page) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'result' and fields[i + 1] == ARGV[1] then return 2 end
      end
    end
    if #page < 100 then break end
    from = '(' .. page[#page][1]
  end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'result', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
