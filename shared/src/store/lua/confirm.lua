-- confirm: clear the unconfirmed mark of the claim a caller's WAIT covered.
-- Keeps invariant 1: a mark that a later re-home set (another owner or epoch) stays until that
-- claim's own WAIT succeeds, so no lookup routes to a claim a failover could still lose.
-- KEYS[1] conference record. ARGV[1] owner node id, ARGV[2] epoch, as the claim answered.
-- Returns 1 when the record is that claim (its mark now cleared), 0 otherwise.
local r = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if r[1] == ARGV[1] and r[2] == ARGV[2] then
  redis.call('HDEL', KEYS[1], 'unconfirmed')
  return 1
end
return 0
