-- One replica says it is alive, what it asks of each pool and what it has in flight on
-- each shard; replicas not heard from within the TTL drop out.
-- KEYS[1]: the sorted set of replicas (score: last beat, ms).
-- ARGV[1]: this replica's id; ARGV[2]: the TTL in ms; ARGV[3]: its report
-- ("POOL=REQUESTS,...,@SHARD=REQUESTS,..."); ARGV[4]: the prefix of the replicas' demand keys.
-- Returns {now_ms, id1, beat1, demand1, id2, beat2, demand2, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('SET', ARGV[4] .. ARGV[1], ARGV[3], 'PX', ttl)
local r = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {tostring(now)}
for i = 1, #r, 2 do
  table.insert(out, r[i])
  table.insert(out, r[i + 1])
  table.insert(out, redis.call('GET', ARGV[4] .. r[i]) or '')
end
return out
