-- list_nodes: every node with a live lease, with its claimed-conference count and lease left.
-- Keeps invariant 3 for the index: members whose record expired are removed here.
-- KEYS[1] node index. ARGV[1] prefix.
-- Returns {run_id, nodes}: the `run_id` of the server that ran it ('' when INFO is refused),
-- read in the same step as the listing, so that a reader can tell whether the listing comes
-- from the server it knew (a restart or a failover may have lost the last claims while
-- keeping these records, invariant 1); nodes is a list of flat field/value lists (HGETALL
-- plus claimed and lease_ms).
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A node lives through the millisecond its lease ends at, as Redis keeps a key through the
-- millisecond it expires at: a node listed as gone is then gone to claim.lua too.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = prefix .. 'node:' .. id
  local fields = redis.call('HGETALL', key)
  if #fields == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    fields[#fields + 1] = 'claimed'
    fields[#fields + 1] = redis.call('SCARD', key .. ':confs')
    fields[#fields + 1] = 'lease_ms'
    fields[#fields + 1] = redis.call('PTTL', key)
    out[#out + 1] = fields
  end
end
local info = redis.pcall('INFO', 'server')
local run_id = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
return {run_id, out}
