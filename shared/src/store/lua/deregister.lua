-- deregister: remove a node that shuts down cleanly, with its placement set.
-- Keeps invariant 3 without waiting for the lease: nothing of the node outlives it.
-- KEYS[1] node record, KEYS[2] node index. ARGV[1] prefix, ARGV[2] id.
-- Returns 1 when a record was removed.
local removed = redis.call('DEL', KEYS[1])
redis.call('DEL', ARGV[1] .. 'node:' .. ARGV[2] .. ':confs')
redis.call('ZREM', KEYS[2], ARGV[2])
return removed
