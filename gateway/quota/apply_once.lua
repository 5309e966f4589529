-- apply_once.lua: apply a list of adjustments at most once per operation id, and
-- append a usage event per adjustment to the shard's stream in the same step.
--
-- KEYS[1]    the operation's memo key (the same memo as check_and_charge.lua's,
--            so a charge whose check_and_charge did run late is not applied again;
--            a check that ran and was refused charged nothing, so that one applies,
--            unless the request was voided since)
-- KEYS[2..n-2] the counter or gauge keys to adjust
-- KEYS[n-1]  the shard's usage stream
-- KEYS[n]    the shard's epoch key
-- ARGV[1]    memo TTL (ms)
-- ARGV[2]    the events' mode and shared trailing fields (append_event in usage_event.lua)
-- ARGV[3]    the operation id: each event's id is "<operation id>:<meter>"
-- ARGV[4..]  per key, 5 values: the delta; the key's expiry (ms since the epoch, 0: none);
--            the meter; its period's start (us since the epoch, 0 for a gauge); the
--            event's kind
--
-- Returns 1 when applied, 0 when the operation had already happened, -1 when the
-- epoch key is missing (this Redis lost its data; see check_and_charge.lua); an
-- applied call that returns its events answers {1, events...} (reply).

if redis.call('EXISTS', KEYS[#KEYS]) == 0 then
  return -1
end
local memo = redis.call('GET', KEYS[1])
if memo and string.sub(memo, 1, 2) ~= '0 ' then
  return 0
end
local now = clock()  -- clock and append_event: usage_event.lua
for i = 2, #KEYS - 2 do
  local a = 4 + (i - 2) * 5
  local delta = tonumber(ARGV[a])
  local expire_at = tonumber(ARGV[a + 1])
  redis.call('INCRBY', KEYS[i], delta)
  if expire_at > 0 then
    redis.call('PEXPIREAT', KEYS[i], expire_at)
  end
  if delta ~= 0 then
    append_event(KEYS[#KEYS - 1], ARGV[2], ARGV[3] .. ':' .. ARGV[a + 2], ARGV[a + 2], delta,
      now, tonumber(ARGV[a + 3]), ARGV[a + 4])
  end
end
redis.call('SET', KEYS[1], 'applied', 'PX', tonumber(ARGV[1]))
return reply(1)
