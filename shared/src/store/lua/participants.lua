-- participants: record a conference's participant count, only for its owner at its epoch.
-- Keeps invariant 2: the count decides whether a non-serving owner may be replaced, so a
-- stale owner must not be able to write it. The write also records the count's version
-- (`count_v`), so a heartbeat carrying an older snapshot of the conference cannot undo it
-- (heartbeat.lua); this write is the actor's own and always applies.
-- It also keeps invariant 3 for a claim nobody reached: claim.lua gives a new claim only the
-- short claim lease, and the owner's first count (a caller or dial-out has reached the node)
-- gives it the whole conference lease, which heartbeats then renew.
-- KEYS[1] conference record. ARGV[1] node id, ARGV[2] epoch, ARGV[3] count, ARGV[4] the
-- count's version, ARGV[5] conference lease (ms), ARGV[6] (optional) the conference's
-- settings, kept for an agent that restarts (same owner check).
-- Returns 1 when written, 0 when the caller is not the owner at that epoch.
local r = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if r[1] == ARGV[1] and r[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'participants', tonumber(ARGV[3]), 'count_v', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  if ARGV[6] then redis.call('HSET', KEYS[1], 'settings', ARGV[6]) end
  return 1
end
return 0
