-- renew: extend a conference claim's lease, only for its current owner at its epoch.
-- Keeps invariant 3 (leases, not forever keys): only the living owner keeps a claim alive.
-- KEYS[1] conference record. ARGV[1] node id, ARGV[2] epoch, ARGV[3] lease (ms).
-- Returns 1 when renewed, 0 when the caller is not the owner at that epoch.
local r = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if r[1] == ARGV[1] and r[2] == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
end
return 0
