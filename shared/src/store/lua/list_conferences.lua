-- list_conferences: one page of live conferences in name order.
-- Keeps invariant 3 for the index: names whose claim expired are removed as they are met.
-- KEYS[1] conference index. ARGV[1] prefix, ARGV[2] exclusive start name ('' for the first
-- page), ARGV[3] page size.
-- Returns {next_cursor, name, owner, epoch, participants, created_ms, ...}; next_cursor is
-- '' on the last page (one name more is read to know: a full last page has none).
local prefix, after, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local start = '-'
if after ~= '' then start = '(' .. after end
local names = redis.call('ZRANGEBYLEX', KEYS[1], start, '+', 'LIMIT', 0, count + 1)
local more = #names > count
if more then names[#names] = nil end
local out = {''}
for _, name in ipairs(names) do
  local r = redis.call('HMGET', prefix .. 'conf:' .. name, 'owner', 'epoch', 'participants',
    'created_ms')
  if r[1] then
    out[#out + 1] = name
    out[#out + 1] = r[1]
    -- A field another writer left non-numeric must not leave a hole in the reply.
    out[#out + 1] = tonumber(r[2]) or 0
    out[#out + 1] = tonumber(r[3]) or 0
    out[#out + 1] = tonumber(r[4]) or 0
  else
    redis.call('ZREM', KEYS[1], name)
  end
end
if more then out[1] = names[#names] end
return out
