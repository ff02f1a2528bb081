-- keep: extends the claims a node's last agent life left, while the agent started again
-- under its id has not yet compared them with what its Asterisk still holds (its first
-- reconciliation, which adopts the conferences whose callers are still in the bridges and
-- gives the others back). Left alone they would expire meanwhile (an Asterisk slow to take
-- the new agent's connection, say) while their callers are still talking, and a controller
-- would place those conferences on another node: a conference in two places (invariant 1).
-- Invariant 3 still holds: only a claim that exists and names this node is extended, never
-- created and never past the conference lease from now, and the agent asks for no longer
-- than ari.release_after after its start, as a running agent keeps its claims while its
-- Asterisk is out of reach.
-- Only while the node's record lives: a node gone keeps nothing alive.
-- KEYS[1] node placement set, KEYS[2] node record. ARGV[1] prefix, ARGV[2] id, ARGV[3]
-- conference lease (ms).
-- Returns {claims kept, participants their records last counted}: until it has looked, the
-- agent reports that load rather than its own (nothing yet), so neither placement nor
-- claim.lua's participant limit (invariant 4) takes the node for empty meanwhile.
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 0} end
local conf_lease = tonumber(ARGV[3])
local kept, participants = 0, 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ckey = ARGV[1] .. 'conf:' .. name
  local r = redis.call('HMGET', ckey, 'owner', 'participants')
  if r[1] == ARGV[2] then
    local pttl = redis.call('PTTL', ckey)
    if pttl >= 0 and pttl < conf_lease then redis.call('PEXPIRE', ckey, conf_lease) end
    kept = kept + 1
    -- A count that is no whole number (written by hand) adds nothing.
    local n = tonumber(r[2])
    if n and n > 0 and n == math.floor(n) then participants = participants + n end
  end
end
return {kept, participants}
