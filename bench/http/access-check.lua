-- wrk script: POST /v1/access-checks (no reservation) for a random consumer.
-- Env: TALLY_MERCHANT_KEY, TALLY_CONSUMERS (consumers are org_2 .. org_{n+1}).
local threads = {}
local key = os.getenv("TALLY_MERCHANT_KEY")
local consumers = tonumber(os.getenv("TALLY_CONSUMERS"))

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(id * 7919)
end

request = function()
  local body = string.format('{"consumer":"org_%d","meter":"tokens","quantity":"%d"}',
    math.random(2, consumers + 1), math.random(1, 5000))
  return wrk.format("POST", "/v1/access-checks",
    { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }, body)
end

response = function(status, headers, body)
  if status ~= 200 or not string.find(body, '"allowed":true', 1, true) then
    print("unexpected answer " .. status .. ": " .. body)
  end
end
