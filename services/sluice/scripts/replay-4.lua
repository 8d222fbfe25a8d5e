-- KEYS: dead stream, the lane to queue on, result key, job (dedupe) key.
-- ARGV: dead entry id, then the field/value pairs to queue.
-- Puts one dead letter back on its lane, atomically: the new entry is added, the job's
-- `dead_lettered` result and dedupe record removed (so the replay can be answered), and the
-- dead letter deleted. Returns {'replayed', new id}, {'missing'} when the dead letter is gone
-- (replayed or purged already), or {'answered', status} when the job has another final result.
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return {'missing'} end
local stored = redis.call('GET', KEYS[3])
if stored then
  local ok, result = pcall(cjson.decode, stored)
  local code = ok and type(result) == 'table' and type(result['error']) == 'table'
    and result['error']['code']
  if code ~= 'dead_lettered' then
    return {'answered', ok and type(result) == 'table' and tostring(result['status']) or '?'}
  end
  redis.call('DEL', KEYS[3])
end
redis.call('DEL', KEYS[4])
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return {'replayed', id}
