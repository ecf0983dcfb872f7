-- wrk script: POST /v1/usage (one event per request) or, with TALLY_BATCH > 1,
-- POST /v1/usage/batch with TALLY_BATCH events; every event id is unique.
-- Env: TALLY_MERCHANT_KEY, TALLY_CONSUMERS (consumers are org_2 .. org_{n+1}), TALLY_BATCH.
local threads = {}
local counter = 0
local key = os.getenv("TALLY_MERCHANT_KEY")
local consumers = tonumber(os.getenv("TALLY_CONSUMERS"))
local batch = tonumber(os.getenv("TALLY_BATCH") or "1")
local run = os.time()

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(id * 7919)
end

local function event()
  counter = counter + 1
  return string.format('{"event_id":"w%d-%d-%d","consumer":"org_%d","meter":"tokens","quantity":"%d"}',
    run, id, counter, math.random(2, consumers + 1), math.random(1, 5000))
end

request = function()
  local headers = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
  if batch <= 1 then
    return wrk.format("POST", "/v1/usage", headers, event())
  end
  local events = {}
  for i = 1, batch do
    events[i] = event()
  end
  return wrk.format("POST", "/v1/usage/batch", headers, '{"events":[' .. table.concat(events, ",") .. ']}')
end

response = function(status, headers, body)
  if batch <= 1 and status ~= 201 then
    print("unexpected status " .. status .. ": " .. body)
  elseif batch > 1 and (status ~= 200 or not string.find(body, '"refused":0', 1, true)) then
    print("unexpected batch answer " .. status .. ": " .. string.sub(body, 1, 300))
  end
end
