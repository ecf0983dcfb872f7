-- wrk script: GET /v1/wallets/{id} for a random consumer wallet. Env: TALLY_KEY, TALLY_CONSUMERS.
local key = os.getenv("TALLY_KEY")
local consumers = tonumber(os.getenv("TALLY_CONSUMERS"))

request = function()
  return wrk.format("GET", string.format("/v1/wallets/wal_%d", math.random(1, consumers)), {
    ["Authorization"] = "Bearer " .. key,
  })
end
