-- set_state: change a live node's state (serving | draining | shutting_down).
-- Keeps invariant 4: the claim script reads this state before placing anything. A node
-- whose lease expired is not brought back by this script, and a node stopping for good
-- (its own shutdown drain) cannot be made serving again by an admin: it would take new
-- conferences and end them at its drain deadline.
-- Keeps invariant 4's deadline across an agent restart: `drain_since_ms` records (Redis time)
-- when the node's current drain began, so an agent started again mid-drain ends it at the
-- deadline it had, not a full deadline later.
-- Keeps the node's state from going back after a Redis failover lost its last write: every
-- write numbers the state (`state_seq`, and `state_seq_state`, the state that number went
-- with); an agent that finds an older number than the one it last saw with another state
-- writes its own again (heartbeat.lua returns the number). The number is Redis's clock in ms
-- (one past the last if that is not behind it), so a write made after a failover to a replica
-- that missed some is numbered above them all the same. A state written without a number (a
-- controller from before) is told by `state_seq_state` not matching it.
-- KEYS[1] node record. ARGV[1] state. ARGV[2] who: 'admin', 'node', or 'node-stopping'
-- (the node itself, starting or in its shutdown; marks the record stopping). ARGV[3], when
-- given: the number the writer read (an agent writing back a state a failover took away);
-- a record numbered otherwise by now was written since (an admin), and is left as it is.
-- Returns the previous state; false when the node has no live record; {'stopping', state}
-- when an admin change is refused because the node is stopping; {'superseded', state} when
-- ARGV[3] no longer numbers the record.
local before = redis.call('HGET', KEYS[1], 'state')
if not before then return false end
if ARGV[2] == 'admin' and redis.call('HGET', KEYS[1], 'stopping') == '1' then
  return {'stopping', before}
end
local last = tonumber(redis.call('HGET', KEYS[1], 'state_seq')) or 0
if ARGV[3] and ARGV[3] ~= '' and last ~= tonumber(ARGV[3]) then
  return {'superseded', before}
end
if ARGV[2] == 'node-stopping' then redis.call('HSET', KEYS[1], 'stopping', '1') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'state_seq', math.max(now, last + 1),
  'state_seq_state', ARGV[1])
if ARGV[1] == 'serving' then
  redis.call('HDEL', KEYS[1], 'drain_since_ms')
elseif before == 'serving' or redis.call('HEXISTS', KEYS[1], 'drain_since_ms') == 0 then
  redis.call('HSET', KEYS[1], 'drain_since_ms', now)
end
return before
