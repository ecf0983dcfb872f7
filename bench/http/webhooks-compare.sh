#!/usr/bin/env bash
# Charge throughput with and without webhooks, side by side: single usage events
# (POST /v1/usage, 64 connections) on a fresh server each time, alternating off and
# on, ROUNDS times; "on" adds a platform endpoint for every event type, delivered to
# `tally webhooks listen --quiet` on the same machine. Env: DURATION (default 20s),
# ROUNDS (default 2), CONSUMERS (default 200).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
tally=${CARGO_TARGET_DIR:-target}/release/tally
"$tally" webhooks listen --listen 127.0.0.1:19000 --quiet 2>/dev/null &
receiver=$!
trap 'kill $receiver 2>/dev/null' EXIT
for round in $(seq "${ROUNDS:-2}"); do
  echo "#### round $round: webhooks off"
  ONLY=single bash bench/http/usage-run.sh 2>&1 | grep -v WARN
  echo "#### round $round: webhooks on"
  ONLY=single WEBHOOK_URL=http://127.0.0.1:19000/hook bash bench/http/usage-run.sh 2>&1 | grep -v WARN
done
