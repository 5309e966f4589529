-- usage_event.lua: prepended to every script that charges (see redis_store.py),
-- so the clock and the usage events' wire form are written once.

-- Redis TIME in microseconds since the epoch.
local function clock()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000000 + tonumber(time[2])
end

-- Append one usage event to `stream` in the wire form of gateway/usage/events.py:
-- fields separated by \31: version, id, meter, quantity, time (us), period start (us),
-- kind, then `shared` (tenant, route, method, status, request id). An empty `shared`
-- records nothing. Numbers go through %d: Lua's tostring keeps only 14 digits.
local function append_event(stream, shared, id, meter, quantity, at, period_start, kind)
  if shared == '' then return end
  local event = string.format('v1\31%s\31%s\31%d\31%d\31%d\31%s\31%s',
    id, meter, quantity, at, period_start, kind, shared)
  redis.call('XADD', stream, '*', 'e', event)
end

