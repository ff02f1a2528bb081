-- time: Redis's clock, read on the server that holds the data (KEYS[1] is any key under the
-- prefix, so on a Cluster this runs where the claims live, and every process compares its
-- clock with the same server's). Command deadlines are reckoned on it, so a node tells a
-- command held on its way from hosts whose clocks differ. Keeps no invariant of
-- DESIGN.md's list by itself; it serves call control's promise that a command the
-- controller reported unanswered is not carried out later.
-- KEYS[1] a key in the prefix's slot (not read). Returns {seconds, microseconds}.
return redis.call('TIME')
