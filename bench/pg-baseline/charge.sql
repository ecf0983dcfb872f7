-- One charge of 0.024 in one transaction, 2% platform fee.
-- Consumer: uniform over 1..100000.
-- Merchant: half of the charges go to the hot merchant 1000001,
--           the rest uniformly to merchants 1000002..1001000.
-- The platform revenue wallet (id 0) is NOT updated per charge: doing so
-- would serialize every transaction on that one row (see README.md).
\set consumer random(1, 100000)
\set coin random(0, 1)
\set merchant case when :coin = 0 then 1000001 else random(1000002, 1001000) end
BEGIN;
UPDATE wallets SET balance = balance - 0.024 WHERE id = :consumer AND balance >= 0.024;
UPDATE wallets SET balance = balance + 0.02352 WHERE id = :merchant;
INSERT INTO movements (wallet_id, amount) VALUES (:consumer, -0.024), (:merchant, 0.02352);
COMMIT;
