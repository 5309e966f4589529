-- restore.lua: set a shard's counters from the ledger, then its epoch key, unless
-- another process restored the shard first (its charges since then must stay).
--
-- KEYS[1]    the shard's epoch key
-- KEYS[2..]  the counter and gauge keys to set
-- ARGV[1]    the epoch's value (when it was restored, for operators)
-- ARGV[2..]  per key: the value, then its expiry (ms since the epoch, 0: none)
--
-- Returns 1 when restored, 0 when the shard was whole already.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
for i = 2, #KEYS do
  local value = ARGV[2 * i - 2]
  local expire_at = tonumber(ARGV[2 * i - 1])
  if expire_at > 0 then
    redis.call('SET', KEYS[i], value, 'PXAT', expire_at)
  else
    redis.call('SET', KEYS[i], value)
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
