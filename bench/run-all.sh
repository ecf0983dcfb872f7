#!/usr/bin/env bash
# Runs every figure BENCHMARKS.md quotes, side by side in one session, and prints the
# JSON lines of `tally bench` plus the PostgreSQL baseline. Takes about 10 minutes.
# Usage: bench/run-all.sh > bench/results.txt
set -euo pipefail
cd "$(dirname "$0")/.."
export TALLY_LOG=warn
cargo build --release --quiet
tally=${CARGO_TARGET_DIR:-target}/release/tally
echo "== machine: $(lscpu | grep 'Model name' | sed 's/ \+/ /g'), $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB"
echo "== date: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD)"
run() { echo "== tally bench $*"; "$tally" bench --json "$@"; }
run --storage off --workload all --operations 2000000
run --storage off --workload charge --operations 2000000
run --storage off --workload charge --operations 100 --consumers 1000000 --merchants 1000
run --storage on --workload all --operations 2000000
run --storage on --workload charge --operations 2000000
run --storage on --workload charge --operations 1000000 --batch-size-max 100
run --storage on --workload charge --operations 1500000 --rate 50000
run --storage on --workload restart --consumers 1000000 --merchants 1000 --operations 5000000
echo "== PostgreSQL baseline (bench/pg-baseline/run.sh)"
DURATION=30 bench/pg-baseline/run.sh
