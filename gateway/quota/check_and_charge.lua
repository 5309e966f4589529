-- check_and_charge.lua: check every bucket of one request, then charge all or none,
-- and append a usage event per charge to the shard's stream in the same step.
-- The rules are those of gateway/quota/rules.py (`decide`); this script must
-- agree with them exactly, and the contract tests hold it to that.
--
-- KEYS[1]    the request id's memo: a retry gets the first answer, charges nothing
-- KEYS[2..]  per meter: a counter's previous, current and next period keys, or a
--            gauge's one key; then one key per rate limit; then the shard's usage
--            stream; last, the shard's epoch key (all with one hash tag)
-- ARGV is laid out by gateway/quota/script_args.py, whose names (ARG_*, M_*, R_*) are
-- prepended to this script:
-- ARG_MEMO_TTL_MS    memo TTL (ms)     ARG_GRACE_MS  how long a counter outlives its period (ms)
-- ARG_METERS         number of meters  ARG_RATES     number of rate limits
-- ARG_MODE   "check", or "void": the caller gave up on this request (a timeout,
--            answered 503); if it ran and charged, its charges are undone, and
--            whether it charged, was refused or has not run, a marker is left in
--            the memo: nothing charges under this id later (apply_once included)
-- ARG_EVENT_FIELDS   the events' mode and shared trailing fields (append_event in usage_event.lua)
-- ARG_OPERATION_ID   the operation id: each event's id is "<operation id>:<meter>"
-- then (from FIRST_METER) METER_VALUES values per meter: kind ("c" counter, "g" gauge); the three periods'
--            start and end (microseconds since the epoch; zeros for a gauge);
--            limit (-1: unlimited); hard (1/0); cost charged now; needs_remaining (1/0);
--            the three periods' credits, added to a limited meter's limit (zeros for a
--            gauge); the meter's name
-- then RATE_VALUES values per rate limit: emission interval (us), burst, cost
--
-- Returns "E" when the epoch key is missing: this Redis lost its data, and nothing
-- may be checked or charged until the counters are restored from the ledger.
-- Otherwise "N <state>" for a new answer or "R <state>" for a replayed one, where
-- <state> is "allowed now_us chosen... used... tats...", integers: the state read
-- before charging, from which the gateway builds the full decision.
-- The clock is Redis TIME. Numbers are written with %d: Lua's tostring keeps
-- only 14 significant digits, and a time in microseconds has 16. A call that
-- returns its events instead of appending them answers {answer, events...} (reply).

-- One usage event of this request (clock and append_event: usage_event.lua).
local function record(id_suffix, meter, quantity, at, period_start, kind)
  append_event(KEYS[#KEYS - 1], ARGV[ARG_EVENT_FIELDS], ARGV[ARG_OPERATION_ID] .. ':' .. meter .. id_suffix, meter,
    quantity, at, period_start, kind)
end

if redis.call('EXISTS', KEYS[#KEYS]) == 0 then
  return 'E'
end

local memo = redis.call('GET', KEYS[1])
local memo_ttl_ms = tonumber(ARGV[ARG_MEMO_TTL_MS])
local n_meters = tonumber(ARGV[ARG_METERS])

if ARGV[ARG_MODE] == 'void' then
  if memo and string.sub(memo, 1, 2) == '1 ' then
    -- It ran and charged: undo the meters' charges in the periods it chose.
    local fields = {}
    for field in string.gmatch(memo, '%S+') do fields[#fields + 1] = field end
    local now = clock()
    local k, a = 2, FIRST_METER
    for m = 1, n_meters do
      local key = KEYS[k]
      local period_start = 0
      if ARGV[a + M_KIND] == 'c' then
        local pick = tonumber(fields[2 + m])
        key = KEYS[k + pick]
        period_start = tonumber(ARGV[a + M_START_0 + 2 * pick])
        k = k + 3
      else
        k = k + 1
      end
      local cost = tonumber(ARGV[a + M_COST])
      if cost > 0 then
        redis.call('DECRBY', key, cost)
        record(':void', ARGV[a + M_NAME], -cost, now, period_start, 'void')
      end
      a = a + METER_VALUES
    end
    -- and give back the rate limits' slots still held (gcra.released: move the
    -- TAT back by cost * T unless the TAT this request set is behind now)
    local charged_at = tonumber(fields[2])
    for r = 1, tonumber(ARGV[ARG_RATES]) do
      local tat = redis.call('GET', KEYS[k])
      local spent = tonumber(ARGV[a + R_COST]) * tonumber(ARGV[a + R_INTERVAL_US])
      local charged = math.max(tonumber(fields[2 + 2 * n_meters + r]), charged_at) + spent
      if tat and charged > now then
        redis.call('SET', KEYS[k], string.format('%d', tonumber(tat) - spent), 'KEEPTTL')
      end
      k = k + 1
      a = a + RATE_VALUES
    end
  end
  -- Refused or not run yet, the id is settled all the same (see ARG_MODE).
  if not memo or string.find(memo, '^[01] ') then
    redis.call('SET', KEYS[1], 'V', 'PX', memo_ttl_ms)
  end
  return reply('V')  -- reply: usage_event.lua
end

if memo then
  return 'R ' .. memo
end

local now = clock()
local grace_ms = tonumber(ARGV[ARG_GRACE_MS])
local n_rates = tonumber(ARGV[ARG_RATES])

local k, a = 2, FIRST_METER
local allowed = 1
local chosen, used, tats = {}, {}, {}
local charges = {}  -- {key, cost, expire_at_ms or 0, meter, period start (us), kind}

for m = 1, n_meters do
  local key, expire_at, period_start = nil, 0, 0
  if ARGV[a + M_KIND] == 'c' then
    local pick = 1  -- 0-based: the current period unless the clock says otherwise
    for i = 0, 2 do
      local start_us = tonumber(ARGV[a + M_START_0 + 2 * i])
      local end_us = tonumber(ARGV[a + M_END_0 + 2 * i])
      if start_us <= now and now < end_us then
        pick = i
      end
    end
    key = KEYS[k + pick]
    period_start = tonumber(ARGV[a + M_START_0 + 2 * pick])
    expire_at = math.floor(tonumber(ARGV[a + M_END_0 + 2 * pick]) / 1000) + grace_ms
    chosen[m] = pick
    k = k + 3
  else
    key = KEYS[k]
    chosen[m] = 0
    k = k + 1
  end
  local limit = tonumber(ARGV[a + M_LIMIT])
  if limit >= 0 then
    limit = limit + tonumber(ARGV[a + M_CREDIT_0 + chosen[m]])
  end
  local hard = ARGV[a + M_HARD] == '1'
  local cost = tonumber(ARGV[a + M_COST])
  local needs_remaining = ARGV[a + M_NEEDS_REMAINING] == '1'
  local current = tonumber(redis.call('GET', key) or '0')
  used[m] = current
  if limit >= 0 and hard then
    if cost > 0 and current + cost > limit then
      allowed = 0
    elseif cost <= 0 and needs_remaining and current >= limit then
      allowed = 0
    end
  end
  if cost > 0 then
    local kind = ARGV[a + M_KIND] == 'c' and 'charge' or 'gauge'
    charges[#charges + 1] = {key, cost, expire_at, ARGV[a + M_NAME], period_start, kind}
  end
  a = a + METER_VALUES
end

local new_tats = {}
for r = 1, n_rates do
  local interval = tonumber(ARGV[a + R_INTERVAL_US])
  local burst = tonumber(ARGV[a + R_BURST])
  local cost = tonumber(ARGV[a + R_COST])
  local tat = tonumber(redis.call('GET', KEYS[k]) or '0')
  tats[r] = tat
  local new_tat = math.max(tat, now) + cost * interval
  if new_tat - now > burst * interval then
    allowed = 0
  end
  new_tats[r] = new_tat
  k = k + 1
  a = a + RATE_VALUES
end

if allowed == 1 then
  for _, charge in ipairs(charges) do
    redis.call('INCRBY', charge[1], charge[2])
    if charge[3] > 0 then
      redis.call('PEXPIREAT', charge[1], charge[3])
    end
    record('', charge[4], charge[2], now, charge[5], charge[6])
  end
  local first_rate_key = k - n_rates  -- k is one past the last rate key
  for r = 1, n_rates do
    local ttl_ms = math.floor((new_tats[r] - now) / 1000) + 1000
    redis.call('SET', KEYS[first_rate_key + r - 1], string.format('%d', new_tats[r]), 'PX', ttl_ms)
  end
end

local parts = {string.format('%d', allowed), string.format('%d', now)}
for m = 1, n_meters do parts[#parts + 1] = string.format('%d', chosen[m]) end
for m = 1, n_meters do parts[#parts + 1] = string.format('%d', used[m]) end
for r = 1, n_rates do parts[#parts + 1] = string.format('%d', tats[r]) end
local state = table.concat(parts, ' ')
redis.call('SET', KEYS[1], state, 'PX', memo_ttl_ms)
return reply('N ' .. state)
