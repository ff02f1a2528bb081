-- list_conferences: one page of live conferences in name order.
-- Keeps invariant 3 for the index: names whose claim expired are removed as they are met.
-- A page is filled past such names (reading at most ten pages' worth and a hundred more),
-- so a short page is usually the last one.
-- KEYS[1] conference index. ARGV[1] prefix, ARGV[2] exclusive start name ('' for the first
-- page), ARGV[3] page size.
-- Returns {next_cursor, name, owner, epoch, participants, created_ms, count_v, ...};
-- next_cursor is
-- '' on the last page (one name more is read to know: a full last page has none), else the
-- last name read.
local prefix, after, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cursor = '-'
if after ~= '' then cursor = '(' .. after end
local out = {''}
local found, read = 0, 0
local cap = count * 10 + 100
while true do
  local want = count - found
  local names = redis.call('ZRANGEBYLEX', KEYS[1], cursor, '+', 'LIMIT', 0, want + 1)
  local last
  for i = 1, math.min(#names, want) do
    local name = names[i]
    read = read + 1
    local r = redis.call('HMGET', prefix .. 'conf:' .. name, 'owner', 'epoch', 'participants',
      'created_ms', 'count_v')
    if r[1] then
      out[#out + 1] = name
      out[#out + 1] = r[1]
      -- A field another writer left non-numeric must not leave a hole in the reply.
      out[#out + 1] = tonumber(r[2]) or 0
      out[#out + 1] = tonumber(r[3]) or 0
      out[#out + 1] = tonumber(r[4]) or 0
      out[#out + 1] = tonumber(r[5]) or 0
      found = found + 1
    else
      redis.call('ZREM', KEYS[1], name)
    end
    last = name
  end
  -- No name past those read: the index ends here.
  if #names <= want then return out end
  if found == count or read >= cap then
    out[1] = last
    return out
  end
  cursor = '(' .. last
end
