-- set_state: change a live node's state (serving | draining | shutting_down).
-- Keeps invariant 4: the claim script reads this state before placing anything. A node
-- whose lease expired is not brought back by this script.
-- KEYS[1] node record. ARGV[1] state.
-- Returns the previous state, or false when the node has no live record.
local before = redis.call('HGET', KEYS[1], 'state')
if not before then return false end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return before
