-- Settles this replica's leases of tenant buckets with the store's, all in one call.
-- KEYS: one bucket per key. ARGV: four per key, in order:
--   per_minute  the allowance (a minute's worth at most is saved up)
--   want        units the replica wants to hold after this call
--   held        units it holds now (negative: debt, which the store takes over)
--   init        the level of a bucket the store does not have (a new one: full; one the
--               replica knew before the store lost it: what the replica last saw)
-- A bucket the store drops by expiry is full: the key lives until it would refill.
-- Returns, per key, {granted, level}: the units added to the replica's lease (negative:
-- returned) and the store's level after, both as strings (Lua numbers are doubles).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 4
  local cap = tonumber(ARGV[b + 1])
  local want = tonumber(ARGV[b + 2])
  local held = tonumber(ARGV[b + 3])
  local init = tonumber(ARGV[b + 4])
  local rate = cap / 60000
  local s = redis.call('HMGET', key, 'u', 't')
  local level = tonumber(s[1])
  local at = tonumber(s[2])
  if level == nil or at == nil then
    level = math.min(cap, init)
    at = now
  end
  level = math.min(cap, level + math.max(0, now - at) * rate)
  if held < 0 then
    level = level + held
    held = 0
  end
  local granted = want - held
  if granted > 0 then
    granted = math.min(granted, math.max(0, level))
  end
  level = level - granted
  redis.call('HSET', key, 'u', string.format('%.6f', level), 't', now)
  local until_full = math.ceil((cap - level) / math.max(rate, 1e-9))
  redis.call('PEXPIRE', key, math.max(1000, until_full + 1000))
  out[i] = {string.format('%.6f', granted), string.format('%.6f', level)}
end
return out
