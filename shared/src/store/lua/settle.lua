-- settle: keeps invariant 1 after Redis lost every node record (a restart without
-- persistence, or an outage longer than every lease). A running agent that must register
-- again calls it first; when no node is live, it marks the store settling for one lease, and
-- claim.lua places and re-homes nothing while the mark lives. The nodes that were live then
-- have time to register again and claim back the conferences they host: without the mark,
-- the first node back would be given the live conferences of the others (a second home).
-- A running controller waits on its own after trouble it saw; the mark also holds back one
-- that started meanwhile and knows of no node from before.
-- KEYS[1] node index, KEYS[2] the mark (<prefix>settling).
-- ARGV[1] how long the mark lives (ms): the registering node's lease, at most 10 s.
-- Returns 1 when it set the mark, 0 when a node is live (nothing was lost).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZCOUNT', KEYS[1], now, '+inf') > 0 then return 0 end
redis.call('SET', KEYS[2], now, 'PX', tonumber(ARGV[1]))
return 1
