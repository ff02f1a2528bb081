-- register: announce a node with a lease (invariant 3: a crashed node's record expires).
-- KEYS[1] node record, KEYS[2] node index.
-- ARGV[1] prefix, ARGV[2] id, ARGV[3] lease (ms), ARGV[4] sip_uri, ARGV[5] control,
-- ARGV[6] zone, ARGV[7] capacity, ARGV[8] participant_capacity (0: none; claim.lua places no new
-- conference on a node whose reported participants reached it, invariant 4),
-- ARGV[9] state, ARGV[10] '1'/'0': the agent's ARI events WebSocket is up. It
-- keeps invariant 4 from the first moment: an agent that has not reached its Asterisk yet
-- can admit nobody, so claim.lua must not place on it. Empty (a registration that does not
-- know): the field is removed, and unknown counts as up.
-- ARGV[11] for a registration that is not serving: when its drain began (Redis time, ms),
-- as the agent knows it from its last life's record, or empty; a live record's own
-- `drain_since_ms` wins (set_state.lua keeps it, for invariant 4's deadline).
-- ARGV[12] the state the agent read in this record before registering, or empty. A live
-- record, not stopping, whose state differs from it was changed by an admin since
-- (set_state.lua): that drain or undrain wins over the state the agent brings, which read
-- the record before it (invariant 4 holds a drain the admin set), and the agent's heartbeat
-- adopts it.
-- ARGV[13] '1' when the agent registering is in its shutdown drain (its record expired and
-- is made again): the record is marked stopping in this same step, so that no admin undrain
-- can make a stopping node serving in between (invariant 4); empty otherwise.
-- The state written is numbered as set_state.lua numbers it (Redis's clock in ms, above a live
-- record's number).
-- Returns the state the record had before (false when it did not exist).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
local before = redis.call('HGET', KEYS[1], 'state')
local seen = ARGV[12] or ''
local state = ARGV[9]
-- Not for an agent in its shutdown drain (ARGV[13]): it drains whatever an admin set.
local admin_changed = seen ~= '' and before and before ~= seen
  and (before == 'serving' or before == 'draining')
  and redis.call('HGET', KEYS[1], 'stopping') ~= '1'
  and ARGV[13] ~= '1'
if admin_changed then state = before end
-- `lease_period_ms`: the lease each renewal grants, so an agent starting under the same id
-- knows how long a live one may take to renew (three of its heartbeats).
-- `registered_ms`: since when this record has lived (settle.lua's evidence that Redis lost
-- nothing). An agent restarting over its live record keeps it: the record never went away.
local registered = before and redis.call('HGET', KEYS[1], 'registered_ms') or now
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'sip_uri', ARGV[4], 'control', ARGV[5],
  'zone', ARGV[6], 'capacity', ARGV[7], 'participant_capacity', ARGV[8], 'state', state,
  'conferences', 0,
  'participants', 0, 'cpu', 0, 'registered_ms', registered, 'updated_ms', now,
  'lease_period_ms', lease)
local last = tonumber(redis.call('HGET', KEYS[1], 'state_seq')) or 0
redis.call('HSET', KEYS[1], 'state_seq', math.max(now, last + 1), 'state_seq_state', state)
-- A new registration is a new life: a stopping mark of the last one does not carry over;
-- a stopping agent registering again marks its own.
if ARGV[13] == '1' then
  redis.call('HSET', KEYS[1], 'stopping', 1)
else
  redis.call('HDEL', KEYS[1], 'stopping')
end
-- Nor does the last life's ARI state.
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[1], 'ari', ARGV[10])
else
  redis.call('HDEL', KEYS[1], 'ari')
end
if admin_changed then
  -- The admin's change keeps the drain start it wrote, or cleared.
elseif state == 'serving' then
  redis.call('HDEL', KEYS[1], 'drain_since_ms')
elseif not before or before == 'serving'
    or redis.call('HEXISTS', KEYS[1], 'drain_since_ms') == 0 then
  redis.call('HSET', KEYS[1], 'drain_since_ms', tonumber(ARGV[11]) or now)
end
redis.call('PEXPIRE', KEYS[1], lease)
redis.call('ZADD', KEYS[2], now + lease, ARGV[2])
local set = ARGV[1] .. 'node:' .. ARGV[2] .. ':confs'
if redis.call('EXISTS', set) == 1 then redis.call('PEXPIRE', set, lease) end
return before
