-- hold: keeps the record of a node whose agent is starting again under its id alive while
-- the new agent watches it for renewals by another live agent (a node id in use twice). A
-- crashed life's record would otherwise expire during that check, and a controller would
-- place its conferences elsewhere while their callers are still in this node's Asterisk,
-- which the new agent then adopts: a conference in two places (invariant 1). Only a record
-- that exists is extended, never created (invariant 3: a dead node's record still expires
-- when nobody holds it), and `updated_ms` is left alone, so another agent's renewal still
-- shows. The lease is never shortened.
-- KEYS[1] node record, KEYS[2] node index. ARGV[1] prefix, ARGV[2] id, ARGV[3] lease (ms).
-- Returns 1 when the record is held, 0 when it had expired.
local lease = tonumber(ARGV[3])
local left = redis.call('PTTL', KEYS[1])
if left == -2 then return 0 end
if left >= 0 and left < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
  if not score or score < now + lease then
    redis.call('ZADD', KEYS[2], now + lease, ARGV[2])
  end
  local set = ARGV[1] .. 'node:' .. ARGV[2] .. ':confs'
  if redis.call('PTTL', set) >= 0 and redis.call('PTTL', set) < lease then
    redis.call('PEXPIRE', set, lease)
  end
end
return 1
