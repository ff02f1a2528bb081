-- heartbeat: renew a node's lease, record its load, and renew the claims it still holds.
-- Keeps invariant 3 (leases renewed only by the living owner) and invariant 2 (a claim is
-- renewed only for its owner at its epoch; the node learns which ones it lost).
-- It also keeps the node's placement set exact, so claim.lua's capacity check (invariant 4)
-- counts what the node really hosts: placements whose claim expired or moved are dropped,
-- and each renewed claim is put back, since the set has the node's lease and is lost with
-- the node record while the longer conference claims live on.
-- When asked (ARGV[8] = "1": the first heartbeat after Redis trouble or a new registration),
-- a hosted conference whose claim expired (Redis was away longer than the conference lease)
-- is claimed again here, at the node's epoch, in the same step that shows the node alive:
-- a controller that sees this node renewed after Redis trouble then finds its conferences
-- claimed, and never places a second home beside the live bridge (invariant 1).
-- A record that names another owner at an epoch below the node's is an older life come back
-- (Redis restarted from a snapshot, or a failover lost the re-home to this node). Where
-- claim.lua would keep it with that owner (alive and serving, or alive with callers counted)
-- the node is told it lost it: a conflict. Otherwise (the owner dead, or draining with
-- nobody counted) a claim would move it anyway, so it is as good as missing: the node claims
-- its live conference back rather than losing it to the next placement beside its bridge
-- (invariants 1, 2). While settle.lua's mark lives, Redis lost the node records, so "no node
-- record" does not say the owner is dead: such a record is reported missing (the node asks
-- again later, nothing is lost for good) and not taken (claim.lua re-homes nothing then
-- either).
-- KEYS[1] node record, KEYS[2] node index.
-- ARGV[1] prefix, ARGV[2] id, ARGV[3] node lease (ms), ARGV[4] conference lease (ms),
-- ARGV[5] conferences, ARGV[6] participants, ARGV[7] cpu, ARGV[8] "1" to claim again,
-- ARGV[9] "0" while the agent's ARI events WebSocket is down (claim.lua then places no new
-- conference on the node, invariant 4), "1" when it is up,
-- ARGV[10..] quadruples (name, epoch, participants, count version) of conferences the
-- node hosts. At other
-- times a missing claim is one its conference released on ending after the node listed it.
-- Returns {state, its number (set_state.lua; '' when the state was written without one), status
-- per hosted conference: ok | lost | reclaimed | missing}, or {false} when the node has no
-- record (its lease expired; it must register again).
if redis.call('EXISTS', KEYS[1]) == 0 then return {false} end
local prefix, id = ARGV[1], ARGV[2]
local lease, conf_lease = tonumber(ARGV[3]), tonumber(ARGV[4])
local reclaim = ARGV[8] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'conferences', ARGV[5], 'participants', ARGV[6], 'cpu', ARGV[7],
  'ari', ARGV[9], 'updated_ms', now)
redis.call('PEXPIRE', KEYS[1], lease)
redis.call('ZADD', KEYS[2], now + lease, id)

local settling = redis.call('EXISTS', prefix .. 'settling') == 1
local st = redis.call('HMGET', KEYS[1], 'state', 'state_seq', 'state_seq_state')
local seq = ''
if st[1] and st[3] == st[1] then seq = st[2] or '' end
local out = {st[1], seq}
for i = 10, #ARGV, 4 do
  local ckey = prefix .. 'conf:' .. ARGV[i]
  local r = redis.call('HMGET', ckey, 'owner', 'epoch')
  if r[1] == id and r[2] == ARGV[i + 1] then
    local written = tonumber(redis.call('HGET', ckey, 'count_v') or '0') or 0
    if tonumber(ARGV[i + 3]) >= written then
      redis.call('HSET', ckey, 'participants', tonumber(ARGV[i + 2]), 'count_v', ARGV[i + 3])
    end
    redis.call('HSET', ckey, 'updated_ms', now)
    redis.call('PEXPIRE', ckey, conf_lease)
    redis.call('SADD', prefix .. 'node:' .. id .. ':confs', ARGV[i])
    out[#out + 1] = 'ok'
  elseif r[1] and ((tonumber(r[2]) or 0) >= tonumber(ARGV[i + 1])
      or (not settling and (redis.call('HGET', prefix .. 'node:' .. r[1], 'state') == 'serving'
        or (redis.call('EXISTS', prefix .. 'node:' .. r[1]) == 1
          and (tonumber(redis.call('HGET', ckey, 'participants')) or 0) > 0)))) then
    out[#out + 1] = 'lost'
  elseif reclaim and not (r[1] and settling) and (st[1] == 'serving' or st[1] == 'draining') then
    local epoch = tonumber(ARGV[i + 1])
    if r[1] then
      -- The older life's own fields are not this one's.
      redis.call('DEL', ckey)
      redis.call('SREM', prefix .. 'node:' .. r[1] .. ':confs', ARGV[i])
    end
    redis.call('HSET', ckey, 'owner', id, 'epoch', epoch, 'participants',
      tonumber(ARGV[i + 2]), 'count_v', ARGV[i + 3], 'created_ms', now, 'updated_ms', now)
    redis.call('PEXPIRE', ckey, conf_lease)
    redis.call('SADD', prefix .. 'node:' .. id .. ':confs', ARGV[i])
    redis.call('ZADD', prefix .. 'confs', 0, ARGV[i])
    out[#out + 1] = 'reclaimed'
  else
    -- Released by its conference on ending, or the node (shutting down) ends it anyway; or a
    -- dead owner's older record, which the reclaiming heartbeat this answer asks for takes.
    out[#out + 1] = 'missing'
  end
end

local set = prefix .. 'node:' .. id .. ':confs'
for _, name in ipairs(redis.call('SMEMBERS', set)) do
  if redis.call('HGET', prefix .. 'conf:' .. name, 'owner') ~= id then
    redis.call('SREM', set, name)
  end
end
if redis.call('EXISTS', set) == 1 then redis.call('PEXPIRE', set, lease) end
return out
