-- One replica says it is alive; replicas not heard from within the TTL drop out.
-- KEYS[1]: the sorted set of replicas (score: last beat, ms). ARGV[1]: this replica's id,
-- ARGV[2]: the TTL in ms. Returns {now_ms, id1, beat1, id2, beat2, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local r = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
table.insert(r, 1, tostring(now))
return r
