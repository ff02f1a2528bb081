-- release: end a conference's claim by compare-and-delete on (owner, epoch).
-- Keeps invariants 2 and 3: a stale owner (older epoch, or another node) can never delete
-- the claim of the current one. The ended epoch is remembered for ARGV[6] ms (the
-- conference lease) so that the next life of the name starts above it (claim.lua): a late
-- release of this life, retried or delayed in the network, then cannot match the next one,
-- even on the same node. The remembered epoch only grows.
-- KEYS[1] conference record, KEYS[2] conference index.
-- ARGV[1] prefix, ARGV[2] name, ARGV[3] node id, ARGV[4] epoch, ARGV[5] "1" to
-- release only a conference nobody is in (a claim made for a command that was refused may
-- meanwhile have been used by a caller), ARGV[6] how long the ended epoch is remembered (ms),
-- ARGV[7] (optional) the count version (`count_v`) the releaser last saw: a count written
-- since (a new actor of the name counted its first caller in) keeps the claim.
-- Returns 1 when released, 0 when the caller was not the owner at that epoch (or people are
-- in it and ARGV[5] asked, or the count changed since ARGV[7]).
local r = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'participants', 'count_v')
if ARGV[5] == '1' and (tonumber(r[3]) or 0) > 0 then return 0 end
if ARGV[7] and (tonumber(r[4]) or 0) > tonumber(ARGV[7]) then return 0 end
if r[1] == ARGV[3] and r[2] == ARGV[4] then
  redis.call('DEL', KEYS[1])
  -- Never lowered: a life an old owner reclaimed at its own epoch after the name had
  -- lived on elsewhere ends below that one, and the next life must start above both.
  local ended_key = ARGV[1] .. 'ended:' .. ARGV[2]
  local before = tonumber(redis.call('GET', ended_key) or '0') or 0
  local ended = math.max(before, tonumber(ARGV[4]) or 0)
  redis.call('SET', ended_key, ended, 'PX', ARGV[6])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('SREM', ARGV[1] .. 'node:' .. ARGV[3] .. ':confs', ARGV[2])
  return 1
end
return 0
