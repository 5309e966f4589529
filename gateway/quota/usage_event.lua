-- usage_event.lua: prepended to every script that charges (see redis_store.py),
-- so the clock and the usage events' wire form are written once.

-- Redis TIME in microseconds since the epoch.
local function clock()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000000 + tonumber(time[2])
end

-- The events this call returns instead of appending them (see append_event).
local returned = {}

-- Record one usage event in the wire form of gateway/usage/events.py: fields
-- separated by \31: version, id, meter, quantity, time (us), period start (us),
-- kind, then the shared fields (tenant, route, method, status, request id).
-- `shared` is "" to record nothing, else a mode letter and the shared fields:
-- "X" appends the event to `stream` here, in the same step as the charge; "R"
-- returns it to the gateway (see reply), which appends it to a queue on another
-- Redis. Numbers go through %d: Lua's tostring keeps only 14 digits.
local function append_event(stream, shared, id, meter, quantity, at, period_start, kind)
  if shared == '' then return end
  local event = string.format('v1\31%s\31%s\31%d\31%d\31%d\31%s\31%s',
    id, meter, quantity, at, period_start, kind, string.sub(shared, 2))
  if string.sub(shared, 1, 1) == 'R' then
    returned[#returned + 1] = event
  else
    redis.call('XADD', stream, '*', 'e', event)
  end
end

-- A script's answer: `value` alone, or {value, events...} when it returns events.
local function reply(value)
  if #returned == 0 then return value end
  table.insert(returned, 1, value)
  return returned
end

