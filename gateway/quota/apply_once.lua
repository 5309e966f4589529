-- apply_once.lua: apply a list of adjustments at most once per operation id.
--
-- KEYS[1]    the operation's memo key (the same memo as check_and_charge.lua's,
--            so a charge whose check_and_charge did run late is not applied again;
--            a check that ran and was refused charged nothing, so that one applies)
-- KEYS[2..]  the counter or gauge keys to adjust
-- ARGV[1]    memo TTL (ms)
-- ARGV[2..]  per key: the delta, then the key's expiry (ms since the epoch, 0: none)
--
-- Returns 1 when applied, 0 when the operation had already happened.

local memo = redis.call('GET', KEYS[1])
if memo and string.sub(memo, 1, 2) ~= '0 ' then
  return 0
end
for i = 2, #KEYS do
  local delta = tonumber(ARGV[2 * i - 2])
  local expire_at = tonumber(ARGV[2 * i - 1])
  redis.call('INCRBY', KEYS[i], delta)
  if expire_at > 0 then
    redis.call('PEXPIREAT', KEYS[i], expire_at)
  end
end
redis.call('SET', KEYS[1], 'applied', 'PX', tonumber(ARGV[1]))
return 1
