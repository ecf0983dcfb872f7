#!/usr/bin/env bash
# HTTP load benchmark: `tally serve` on a fresh temporary database, wrk on the same
# machine over loopback, 64 connections: transfers, then balance reads.
# Needs wrk (Debian package `wrk`). Env: DURATION (default 20s), CONSUMERS (default 200),
# TALLY_BIN (a tally binary to run instead of building this checkout).
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION="${DURATION:-20s}"
export TALLY_CONSUMERS="${CONSUMERS:-200}"
PORT="${PORT:-18181}"
source bench/http/thread-cpu.sh
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
# TALLY_BIN runs a given build (to compare two side by side); otherwise build this one.
if [ -z "${TALLY_BIN:-}" ]; then cargo build --release --quiet; fi
tally=${TALLY_BIN:-${CARGO_TARGET_DIR:-target}/release/tally}
# KEEP_DATA=DIR keeps the server's files there afterwards (to replay the journal, say).
data=$(mktemp -d)
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; [ -n "${KEEP_DATA:-}" ] && mv "$data" "$KEEP_DATA"; rm -rf "$data"' EXIT
TALLY_LOG=warn "$tally" serve --data-dir "$data" --listen "127.0.0.1:$PORT" > "$data/out.txt" &
server=$!
for _ in $(seq 50); do grep -q tly_adm_ "$data/out.txt" 2>/dev/null && break; sleep 0.1; done
export TALLY_KEY=$(grep -o 'tly_adm_[0-9a-f]*' "$data/out.txt")
api() { curl -sf -X "$1" "http://127.0.0.1:$PORT$2" -H "Authorization: Bearer $TALLY_KEY" -H 'content-type: application/json' ${3:+-H "Idempotency-Key: $3"} -d "$4" > /dev/null; }
echo "== setup: $TALLY_CONSUMERS funded consumer wallets and one merchant wallet"
for n in $(seq 1 $((TALLY_CONSUMERS + 1))); do
  api POST /v1/organizations "" '{"name":"org"}'
  api POST "/v1/organizations/org_$n/wallets" "" '{"currency":"USD"}'
  [ "$n" -le "$TALLY_CONSUMERS" ] && api POST "/v1/wallets/wal_$n/adjustments" "fund-$n" '{"direction":"credit","amount":"100000.00","currency":"USD","reason":"bench"}'
done
phase_cpu "$server" > /dev/null
echo "== transfers: wrk -t2 -c64 -d$DURATION --latency -s bench/http/transfer.lua"
wrk -t2 -c64 -d"$DURATION" --latency -s bench/http/transfer.lua "http://127.0.0.1:$PORT" | grep -E "Latency|50%|99%|Requests/sec|requests in|Non-2xx|unexpected" | head -12
phase_cpu "$server"
phase_cpu "$server" > /dev/null
echo "== balance reads: wrk -t2 -c64 -d$DURATION --latency -s bench/http/balance.lua"
wrk -t2 -c64 -d"$DURATION" --latency -s bench/http/balance.lua "http://127.0.0.1:$PORT" | grep -E "Latency|50%|99%|Requests/sec|requests in|Non-2xx" | head -12
phase_cpu "$server"
