#!/usr/bin/env bash
# PostgreSQL baseline for Tally: the one-UPDATE-per-charge ledger driven by pgbench.
# Usage: bench/pg-baseline/run.sh [PGURL]
#   PGURL     default postgres://postgres@127.0.0.1:5432/test (or $PGURL)
#   DURATION  seconds per pgbench run, default 30
#   CLIENTS   default 8, THREADS default 2
set -euo pipefail

PGURL="${1:-${PGURL:-postgres://postgres@127.0.0.1:5432/test}}"
DURATION="${DURATION:-30}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
PGBENCH="${PGBENCH:-pgbench}"

cd "$(dirname "$0")"

echo "== $("$PGBENCH" --version)"
echo "== server: $(psql "$PGURL" -Atc 'SHOW server_version')," \
     "synchronous_commit=$(psql "$PGURL" -Atc 'SHOW synchronous_commit')," \
     "fsync=$(psql "$PGURL" -Atc 'SHOW fsync')"

echo "== (re)creating schema"
psql "$PGURL" -q -v ON_ERROR_STOP=1 -f schema.sql

for script in charge.sql charge_hot.sql; do
    echo "== $script: $PGBENCH -n -c $CLIENTS -j $THREADS -T $DURATION -f $script"
    out="$("$PGBENCH" -n -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -f "$script" "$PGURL" 2>&1)" || {
        echo "$out" >&2
        exit 1
    }
    echo "$out" | grep -E '^(number of transactions actually processed|number of failed transactions|latency average|tps)' || true
done

echo "== check: sum of balances must be 100000 * 1000000 minus fees"
psql "$PGURL" -Atc "SELECT 'movements=' || count(*) || ' charges=' || count(*) / 2 FROM movements"
psql "$PGURL" -Atc "SELECT 'total=' || sum(balance) || ' expected=' || (100000::numeric * 1000000 - 0.00048 * (SELECT count(*) / 2 FROM movements)) FROM wallets"
