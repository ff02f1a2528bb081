-- claim: find or place the home of a conference in one atomic step.
-- Keeps invariant 1 (one home: the owner changes only inside this script) and invariant 2
-- (fencing: the owner is replaced only when its node lease has expired, or it is not
-- serving and the conference has no participants; each change of owner adds 1 to the epoch,
-- and a new life of a name released a short while ago starts above its last epoch).
-- Keeps invariant 4: a node that is not serving, whose agent reports its ARI events WebSocket
-- down (it could admit nobody), or is at capacity or at its participant limit, gets no new
-- conference. The owner check below ignores ARI and the limits: callers of a live conference
-- are in that Asterisk, so it keeps its home.
-- Every key shares the prefix's hash tag, so this touches one Cluster slot.
--
-- KEYS[1] conference record   <prefix>conf:<name>
-- KEYS[2] conference index    <prefix>confs
-- ARGV[1] prefix, ARGV[2] name, ARGV[3] claim lease (ms): a home placed here lives that long
-- unless its owner's first count (participants.lua) gives it the conference lease, so a claim
-- no call reaches frees its node's capacity soon (invariants 3 and 4),
-- ARGV[4] "1" when the caller will WAIT for replicas: then every path writes (so the WAIT
-- also covers a claim made by another client that this call only read) and the reply
-- carries the number of replicas online now (a WAIT for more would only time out: one still
-- in its first full sync, as after a failover, acknowledges nothing until the sync is over).
-- A home placed then is marked unconfirmed until that WAIT succeeds (the caller clears the
-- mark), so no lookup routes to a claim a failover could still lose (invariant 1).
-- ARGV[5] the `run_id` of the server the caller last listed the nodes on ('-' for any): a
-- different server here (a restart from saved data, a failover) may have lost claims of
-- live conferences while keeping their nodes' records, so nothing is placed or re-homed
-- until the caller has seen the nodes renew (invariant 1).
-- ARGV[6..] candidate node ids, best first.
-- Returns {outcome, owner, epoch, owner_sip_uri, created_ms, candidates_skipped, replicas}
-- with outcome one of existing | claimed | rehomed | no_capacity | settling (settle.lua's mark
-- lives: Redis lost the node records, and the nodes live before may not be back yet; nothing
-- is placed or re-homed, invariant 1) | server_changed (ARGV[5] names another server).

local prefix, name, lease, touch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local expected = ARGV[5]
local first_candidate = 6
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local replicas = 0
if touch == '1' then
  for line in string.gmatch(redis.call('INFO', 'replication'), 'slave%d+:[^\r\n]*') do
    if string.find(line, 'state=online', 1, true) then replicas = replicas + 1 end
  end
end

local function node_key(id) return prefix .. 'node:' .. id end
local function set_key(id) return prefix .. 'node:' .. id .. ':confs' end

-- A candidate must hold a live lease, be serving with its ARI up, and have room under its
-- capacity, and under its participant limit if it has one (as its last heartbeat counted).
-- A record without `ari` has not had a heartbeat yet since registering.
local function usable(id)
  local n = redis.call('HMGET', node_key(id), 'state', 'capacity', 'sip_uri', 'ari',
    'participant_capacity', 'participants')
  if n[1] ~= 'serving' or n[4] == '0' then return nil end
  local most = tonumber(n[5]) or 0
  if most > 0 and (tonumber(n[6]) or 0) >= most then return nil end
  if redis.call('SCARD', set_key(id)) >= (tonumber(n[2]) or 0) then return nil end
  return n[3]
end

local settling = redis.call('EXISTS', prefix .. 'settling') == 1

-- Read only when a placement is about to be made: INFO is not free, and an existing home
-- is routed whatever server holds it.
local function server_changed()
  if expected == '-' then return false end
  local info = redis.pcall('INFO', 'server')
  if type(info) ~= 'string' then return false end
  local id = string.match(info, 'run_id:(%x+)')
  return id ~= nil and id ~= expected
end

local function place(epoch, created, outcome)
  for i = first_candidate, #ARGV do
    local id = ARGV[i]
    local uri = usable(id)
    if uri then
      -- A running count lets placers see how many placements everyone made between two
      -- looks at the nodes, whatever ended meanwhile. One that is no integer (written by
      -- hand) starts again rather than fail the claim.
      local placed = redis.call('HGET', node_key(id), 'placements')
      if placed and not string.match(placed, '^%-?%d+$') then
        redis.call('HSET', node_key(id), 'placements', 0)
      end
      redis.call('HINCRBY', node_key(id), 'placements', 1)
      redis.call('HSET', KEYS[1], 'owner', id, 'epoch', epoch, 'participants', 0,
        'created_ms', created, 'updated_ms', now)
      -- The settings, callback numbering and count version were the last home's; the new
      -- one has its own.
      redis.call('HDEL', KEYS[1], 'settings', 'callback_seq', 'event_seq', 'count_v')
      -- Not routed by lookups until the caller's WAIT confirms it (it clears the mark). A
      -- caller that waits for no replica places a confirmed home: the mark a last home's
      -- claim may have left is not this one's.
      if touch == '1' then
        redis.call('HSET', KEYS[1], 'unconfirmed', 1)
      else
        redis.call('HDEL', KEYS[1], 'unconfirmed')
      end
      redis.call('PEXPIRE', KEYS[1], lease)
      redis.call('SADD', set_key(id), name)
      -- The placement set lives exactly as long as its node's lease.
      -- (In its last millisecond PTTL says 0; a set without expiry would outlive the node.)
      local pttl = redis.call('PTTL', node_key(id))
      if pttl >= 0 then redis.call('PEXPIRE', set_key(id), math.max(pttl, 1)) end
      redis.call('ZADD', KEYS[2], 0, name)
      return {outcome, id, epoch, uri, created, i - first_candidate, replicas}
    end
  end
  return nil
end

local rec = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'participants', 'created_ms')
if rec[1] then
  -- A record whose epoch is missing or not a number (written by hand, or by something
  -- else) would fail every claim of the name until it expired; it counts as epoch 0.
  local owner, epoch = rec[1], tonumber(rec[2]) or 0
  local participants = tonumber(rec[3]) or 0
  local created = tonumber(rec[4]) or now
  local n = redis.call('HMGET', node_key(owner), 'state', 'sip_uri')
  -- n[1] is false when the owner's lease expired: the owner is dead.
  if n[1] == 'serving' or (n[1] and participants > 0) then
    if touch == '1' then redis.call('HSET', KEYS[1], 'seen_ms', now) end
    return {'existing', owner, epoch, n[2], created, 0, replicas}
  end
  if settling then return {'settling', owner, epoch, '', created, 0, replicas} end
  if server_changed() then return {'server_changed', owner, epoch, '', created, 0, replicas} end
  -- Above the name's last ended life too: a heartbeat may have claimed it back at an epoch
  -- below one that ended meanwhile, and a late compare-and-delete of that life must not
  -- match the new home.
  local ended = tonumber(redis.call('GET', prefix .. 'ended:' .. name) or '0') or 0
  local placed = place(math.max(epoch, ended) + 1, created, 'rehomed')
  if placed then
    redis.call('SREM', set_key(owner), name)
    return placed
  end
  return {'no_capacity', owner, epoch, '', created, #ARGV - first_candidate + 1, replicas}
end

-- A new life of a name starts above the epoch its last life ended with (release.lua keeps it
-- for a conference lease): a late compare-and-delete of that life cannot match this one.
if settling then return {'settling', '', 0, '', 0, 0, replicas} end
if server_changed() then return {'server_changed', '', 0, '', 0, 0, replicas} end
local ended = tonumber(redis.call('GET', prefix .. 'ended:' .. name) or '0') or 0
local placed = place(ended + 1, now, 'claimed')
if placed then return placed end
return {'no_capacity', '', 0, '', 0, #ARGV - first_candidate + 1, replicas}
