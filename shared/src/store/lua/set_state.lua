-- set_state: change a live node's state (serving | draining | shutting_down).
-- Keeps invariant 4: the claim script reads this state before placing anything. A node
-- whose lease expired is not brought back by this script, and a node stopping for good
-- (its own shutdown drain) cannot be made serving again by an admin: it would take new
-- conferences and end them at its drain deadline.
-- KEYS[1] node record. ARGV[1] state. ARGV[2] who: 'admin', 'node', or 'node-stopping'
-- (the node itself, starting or in its shutdown; marks the record stopping).
-- Returns the previous state; false when the node has no live record; {'stopping', state}
-- when an admin change is refused because the node is stopping.
local before = redis.call('HGET', KEYS[1], 'state')
if not before then return false end
if ARGV[2] == 'admin' and redis.call('HGET', KEYS[1], 'stopping') == '1' then
  return {'stopping', before}
end
if ARGV[2] == 'node-stopping' then redis.call('HSET', KEYS[1], 'stopping', '1') end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return before
