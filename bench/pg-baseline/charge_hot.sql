-- One charge of 0.024 in one transaction, 2% platform fee.
-- Consumer: uniform over 1..100000. Merchant: always the hot merchant 1000001.
-- The platform revenue wallet (id 0) is NOT updated per charge (see README.md).
\set consumer random(1, 100000)
\set merchant 1000001
BEGIN;
UPDATE wallets SET balance = balance - 0.024 WHERE id = :consumer AND balance >= 0.024;
UPDATE wallets SET balance = balance + 0.02352 WHERE id = :merchant;
INSERT INTO movements (wallet_id, amount) VALUES (:consumer, -0.024), (:merchant, 0.02352);
COMMIT;
