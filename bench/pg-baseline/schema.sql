-- Tally PostgreSQL baseline: the one-UPDATE-per-charge ledger.
-- (Re)creates the schema and seeds it. Run with: psql "$PGURL" -v ON_ERROR_STOP=1 -f schema.sql

SET client_min_messages = warning;

DROP TABLE IF EXISTS movements;
DROP TABLE IF EXISTS wallets;

CREATE TABLE wallets (
    id      bigint PRIMARY KEY,
    balance numeric(38,12) NOT NULL CHECK (balance >= 0)
);

CREATE TABLE movements (
    id         bigserial PRIMARY KEY,
    wallet_id  bigint,
    amount     numeric(38,12),
    created_at timestamptz DEFAULT now()
);

-- platform revenue wallet
INSERT INTO wallets (id, balance) VALUES (0, 0);

-- 100,000 consumer wallets, ids 1..100000, balance 1,000,000 each
INSERT INTO wallets (id, balance)
SELECT g, 1000000 FROM generate_series(1, 100000) AS g;

-- 1,000 merchant wallets, ids 1000001..1001000, balance 0
-- (1000001 is the "hot" merchant)
INSERT INTO wallets (id, balance)
SELECT g, 0 FROM generate_series(1000001, 1001000) AS g;

VACUUM ANALYZE wallets;
VACUUM ANALYZE movements;
