#!/usr/bin/env bash
# HTTP usage-billing benchmark: `tally serve` on a fresh temporary database, wrk on the
# same machine over loopback: usage batches of 10,000 events (4 connections), single
# usage events (64 connections), access checks (64 connections).
# Needs wrk (Debian package `wrk`). Env: DURATION (default 20s), CONSUMERS (default 200),
# WEBHOOK_URL (if set, a platform webhook endpoint for every event type points there),
# ONLY (batch, single or access: run one of the three; access-open: access checks
# offered at RATE per second, default 30000, by `tally load`, open loop).
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION="${DURATION:-20s}"
export TALLY_CONSUMERS="${CONSUMERS:-200}"
PORT="${PORT:-18182}"
source bench/http/thread-cpu.sh
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
# TALLY_BIN runs a given build (to compare two side by side); otherwise build this one.
if [ -z "${TALLY_BIN:-}" ]; then cargo build --release --quiet; fi
tally=${TALLY_BIN:-${CARGO_TARGET_DIR:-target}/release/tally}
# KEEP_DATA=DIR keeps the server's files there afterwards (to replay the journal, say).
data=$(mktemp -d)
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; [ -n "${KEEP_DATA:-}" ] && mv "$data" "$KEEP_DATA"; rm -rf "$data"' EXIT
TALLY_LOG=warn "$tally" serve --data-dir "$data" --listen "127.0.0.1:$PORT" --webhooks-allow-private > "$data/out.txt" &
server=$!
for _ in $(seq 50); do grep -q tly_adm_ "$data/out.txt" 2>/dev/null && break; sleep 0.1; done
admin=$(grep -o 'tly_adm_[0-9a-f]*' "$data/out.txt")
api() { curl -sf -X "$1" "http://127.0.0.1:$PORT$2" -H "Authorization: Bearer ${KEY:-$admin}" -H 'content-type: application/json' ${3:+-H "Idempotency-Key: $3"} -d "$4"; }
echo "== setup: a merchant (org_1), $TALLY_CONSUMERS funded consumers subscribed to its per-token plan"
api POST /v1/organizations "" '{"name":"merchant","roles":{"merchant":true,"consumer":false}}' > /dev/null
export TALLY_MERCHANT_KEY=$(api POST /v1/api-keys "" '{"organization":"org_1"}' | grep -o 'tly_org_[0-9a-f]*' | tail -1)
KEY=$TALLY_MERCHANT_KEY api POST /v1/meters "" '{"code":"tokens","unit":"token","aggregation":"sum"}' > /dev/null
api POST /v1/plans "" '{"merchant":"org_1","name":"tokens","currency":"USD","billing_period":"month","platform_fee_rate":"0.025","prices":[{"meter":"tokens","model":"per_unit","unit_price":"0.00002"}]}' > /dev/null
for n in $(seq 2 $((TALLY_CONSUMERS + 1))); do
  api POST /v1/organizations "" '{"name":"consumer"}' > /dev/null
  wallet=$(api POST "/v1/organizations/org_$n/wallets" "" '{"currency":"USD"}' | grep -o '"id":"wal_[0-9]*"' | grep -o 'wal_[0-9]*')
  api POST "/v1/wallets/$wallet/adjustments" "fund-$n" '{"direction":"credit","amount":"100000.00","currency":"USD","reason":"bench"}' > /dev/null
  api POST /v1/subscriptions "" "{\"consumer\":\"org_$n\",\"plan\":\"pln_1\"}" > /dev/null
done
if [ -n "${WEBHOOK_URL:-}" ]; then
  echo "== webhooks on: a platform endpoint for every event type -> $WEBHOOK_URL"
  api POST /v1/webhook-endpoints "" "{\"url\":\"$WEBHOOK_URL\",\"event_types\":[\"*\"]}" > /dev/null
fi
if [ -z "${ONLY:-}" ] || [ "$ONLY" = batch ]; then
phase_cpu "$server" > /dev/null
echo "== usage batches of 10,000 events: TALLY_BATCH=10000 wrk -t2 -c4 -d$DURATION --latency -s bench/http/usage.lua"
TALLY_BATCH=10000 wrk -t2 -c4 -d"$DURATION" --timeout 30s --latency -s bench/http/usage.lua "http://127.0.0.1:$PORT" | grep -E "Latency|50%|99%|Requests/sec|requests in|Non-2xx|unexpected" | head -12
phase_cpu "$server"
fi
if [ -z "${ONLY:-}" ] || [ "$ONLY" = single ]; then
phase_cpu "$server" > /dev/null
echo "== single usage events: wrk -t2 -c64 -d$DURATION --latency -s bench/http/usage.lua"
wrk -t2 -c64 -d"$DURATION" --latency -s bench/http/usage.lua "http://127.0.0.1:$PORT" | grep -E "Latency|50%|99%|Requests/sec|requests in|Non-2xx|unexpected" | head -12
phase_cpu "$server"
fi
if [ -n "${WEBHOOK_URL:-}" ]; then
  # Deliveries run behind requests (a lower-priority thread): report how far behind
  # they were when the load stopped, and how long they took to catch up.
  metric() { curl -s "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 ~ "^"m {s+=$2} END {print s+0}'; }
  echo "== webhooks when the load stopped: delivered $(metric 'tally_webhook_deliveries_total{outcome="delivered"') backlog $(metric tally_webhook_backlog)"
  start=$(date +%s.%N)
  for _ in $(seq 600); do
    [ "$(metric tally_webhook_backlog)" = 0 ] && break
    sleep 0.5
  done
  echo "== webhooks caught up in $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s: delivered $(metric 'tally_webhook_deliveries_total{outcome="delivered"') backlog $(metric tally_webhook_backlog)"
fi
if [ -z "${ONLY:-}" ] || [ "$ONLY" = access ]; then
phase_cpu "$server" > /dev/null
echo "== access checks: wrk -t2 -c${CONNECTIONS:-64} -d$DURATION --latency -s bench/http/access-check.lua"
wrk -t2 -c"${CONNECTIONS:-64}" -d"$DURATION" --latency -s bench/http/access-check.lua "http://127.0.0.1:$PORT" | grep -E "Latency|50%|99%|Requests/sec|requests in|Non-2xx|unexpected" | head -12
phase_cpu "$server"
fi
if [ "${ONLY:-}" = access-open ]; then
rate=${RATE:-30000}
body='{"consumer":"org_{rand:2:'$((TALLY_CONSUMERS + 1))'}","meter":"tokens","quantity":"{rand:1:5000}"}'
echo "== access checks, open loop: tally load --rate $rate --connections ${CONNECTIONS:-64} --duration-s ${DURATION%s} (2 s warm-up not measured)"
"$tally" load --url "http://127.0.0.1:$PORT/v1/access-checks" --rate "$rate" --connections "${CONNECTIONS:-64}" \
  --duration-s "${DURATION%s}" --header "Authorization: Bearer $TALLY_MERCHANT_KEY" --body "$body" --expect '"allowed":true'
fi
