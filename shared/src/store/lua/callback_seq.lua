-- callback_seq: reserve the next block of status-callback SequenceNumbers (field
-- callback_seq), or of call-control event seqs (field event_seq), for the conference's current
-- home, so the numbers an application sees keep increasing across agent restarts.
-- Keeps invariant 2's fencing by node: only the node that owns the conference reserves numbers
-- for it (the node, not the epoch: the agent lives of one home share its numbering). No
-- block is handed out twice while the conference keeps its home (claim.lua drops the field
-- when it moves, and the new home's callbacks carry a new ConferenceSid).
-- KEYS[1] conference record. ARGV[1] node id, ARGV[2] block size, ARGV[3] the highest number
-- the caller may already have used (0 after a restart), ARGV[4] the field (callback_seq or
-- event_seq).
-- A home's first agent lifetime numbers from the first block without reserving it, so a
-- record without the field counts as having handed out one block.
-- Returns the new ceiling (the block is ceiling - size + 1 .. ceiling), or -1 when the caller
-- does not own the conference.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
local size = tonumber(ARGV[2])
local field = ARGV[4]
if field ~= 'callback_seq' and field ~= 'event_seq' then
  return redis.error_reply('unknown sequence field')
end
-- A field left non-numeric counts as never reserved rather than failing every reservation.
local ceiling = tonumber(redis.call('HGET', KEYS[1], field) or size) or size
ceiling = math.max(ceiling, tonumber(ARGV[3])) + size
redis.call('HSET', KEYS[1], field, ceiling)
return ceiling
