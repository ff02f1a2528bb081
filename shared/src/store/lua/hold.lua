-- hold: keeps the record of a node whose agent is starting again under its id alive while
-- the new agent watches it for renewals by another live agent (a node id in use twice). A
-- crashed life's record would otherwise expire during that check, and a controller would
-- place its conferences elsewhere while their callers are still in this node's Asterisk,
-- which the new agent then adopts: a conference in two places (invariant 1). The claims the
-- node holds are kept too, for the same reason.
-- Invariant 3 still holds: only a record that exists is extended, never created, and never
-- past two of its lease periods (and a second) after its last renewal (`updated_ms`, which
-- this leaves alone, so another agent's renewal still shows): agents that keep crashing in
-- their check cannot keep a dead node alive. While held the record says its ARI is down, so
-- claim.lua places no new conference on a node whose agent is not running yet (invariant 4),
-- once it has gone two of its heartbeats unrenewed: a record renewed within two (a live
-- agent under the same id, which the check will find) keeps what its agent says of its
-- ARI, as does one that does not say its lease period.
-- KEYS[1] node record, KEYS[2] node index. ARGV[1] prefix, ARGV[2] id, ARGV[3] node lease
-- (ms), ARGV[4] conference lease (ms).
-- Returns 1 when the record exists (held, or past its limit and left to expire), 0 when it
-- had expired.
local lease, conf_lease = tonumber(ARGV[3]), tonumber(ARGV[4])
local left = redis.call('PTTL', KEYS[1])
if left == -2 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'updated_ms', 'lease_period_ms')
local renewed = tonumber(r[1]) or 0
local period = tonumber(r[2]) or lease
if now > renewed + 2 * period + 1000 then return 1 end
-- The lease is three heartbeats: two of them, room for a late one. A record that does not
-- say its period (an older agent's) says nothing of how late its renewal may be.
if r[2] and now > renewed + math.floor(period * 2 / 3) then redis.call('HSET', KEYS[1], 'ari', '0') end
local function keep(key, ms)
  local pttl = redis.call('PTTL', key)
  if pttl >= 0 and pttl < ms then redis.call('PEXPIRE', key, ms) end
end
keep(KEYS[1], lease)
local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
if not score or score < now + lease then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[2])
end
local set = ARGV[1] .. 'node:' .. ARGV[2] .. ':confs'
for _, name in ipairs(redis.call('SMEMBERS', set)) do
  local ckey = ARGV[1] .. 'conf:' .. name
  if redis.call('HGET', ckey, 'owner') == ARGV[2] then keep(ckey, conf_lease) end
end
keep(set, lease)
return 1
