-- settle: keeps invariant 1 after Redis lost every node record (a restart without
-- persistence, or an outage longer than every lease). A running agent that must register
-- again calls it first; when no node from before the loss is live, it marks the store
-- settling for one lease, and claim.lua places and re-homes nothing while the mark lives.
-- The nodes that were live then have time to register again and claim back the conferences
-- they host: without the mark, the first node back would be given the live conferences of
-- the others (a second home).
-- A node registered less than ARGV[2] ago (the caller's lease: its own record was lost no
-- longer ago than that) does not count as being from before the loss: an agent that started
-- into the emptied Redis, or one of the others already back, must not keep the mark off.
-- A node whose record does not say when it registered counts as being from before; an index
-- entry whose record is gone (deleted, or evicted under memory pressure) is no live node.
-- `registered_ms` is when the record appeared: an agent restarting over its live record keeps
-- it (register.lua), so a rolling restart does not make every node look new.
-- A running controller waits on its own after trouble it saw; the mark also holds back one
-- that started meanwhile and knows of no node from before.
-- KEYS[1] node index, KEYS[2] the mark (<prefix>settling).
-- ARGV[1] how long the mark lives at least (ms): the registering node's lease;
-- ARGV[2] how recent a registration is taken for one since the loss (ms); ARGV[3] prefix.
-- Returns 1 when it set the mark, 0 when a node from before is live (nothing was lost).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local recent = tonumber(ARGV[2]) or 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local rec = ARGV[3] .. 'node:' .. id
  if redis.call('EXISTS', rec) == 1 then
    local registered = tonumber(redis.call('HGET', rec, 'registered_ms'))
    if not registered or now - registered >= recent then return 0 end
  end
end
-- Never shortened: a node with a shorter lease (another heartbeat interval) must not cut
-- short the wait a node with a longer one set for the others to come back.
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[2]) < ms then
  redis.call('SET', KEYS[2], now, 'PX', ms)
end
return 1
