-- set_level.lua: set a counter or gauge to a value (admin: a gauge's level, a meter
-- reset), and append the change as a usage event, so that the ledger's totals
-- keep matching the counters (a restore from the ledger must not undo a reset).
--
-- KEYS[1]    the counter or gauge key
-- KEYS[2]    the shard's usage stream
-- KEYS[3]    the shard's epoch key
-- ARGV[1]    the value                   ARGV[2]  the key's expiry (ms since the epoch, 0: none)
-- ARGV[3]    the event's mode and shared trailing fields (append_event in usage_event.lua)
-- ARGV[4]    the event's id              ARGV[5]  the meter
-- ARGV[6]    the period's start (us since the epoch, 0 for a gauge)
-- ARGV[7]    the event's kind
--
-- Returns the previous value ({previous, event} when it returns its event: reply),
-- or "E" when the epoch key is missing (see check_and_charge.lua).

if redis.call('EXISTS', KEYS[3]) == 0 then
  return 'E'
end
local previous = tonumber(redis.call('GET', KEYS[1]) or '0')
local value = tonumber(ARGV[1])
local expire_at = tonumber(ARGV[2])
if expire_at > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', expire_at)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if value ~= previous then  -- clock and append_event: usage_event.lua
  append_event(KEYS[2], ARGV[3], ARGV[4], ARGV[5], value - previous, clock(),
    tonumber(ARGV[6]), ARGV[7])
end
return reply(previous)
