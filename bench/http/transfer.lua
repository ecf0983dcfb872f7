-- wrk script: POST /v1/transfers from a random consumer wallet to the merchant wallet,
-- each request with its own Idempotency-Key. Env: TALLY_KEY, TALLY_CONSUMERS.
local threads = {}
local counter = 0
local key = os.getenv("TALLY_KEY")
local consumers = tonumber(os.getenv("TALLY_CONSUMERS"))

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(id * 7919)
end

request = function()
  counter = counter + 1
  local from = math.random(1, consumers)
  local body = string.format('{"from_wallet":"wal_%d","to_wallet":"wal_%d","amount":"0.01","currency":"USD"}', from, consumers + 1)
  return wrk.format("POST", "/v1/transfers", {
    ["Authorization"] = "Bearer " .. key,
    ["Idempotency-Key"] = string.format("wrk-%d-%d-%d", os.time(), id, counter),
    ["Content-Type"] = "application/json",
  }, body)
end

response = function(status, headers, body)
  if status ~= 201 then
    print("unexpected status " .. status .. ": " .. body)
  end
end
