-- pushfan 0004: token usage moves to a narrow table of its own (issue #9).

-- The day each token last had a notification accepted by its platform, written at most
-- once a day per token. It was device_tokens.last_delivered_at; a broadcast rewrote
-- every token row once a day, and a wide row with six indexes costs PostgreSQL 13-19 us
-- an update (measured: COPY-packed pages leave no room for HOT updates) against 2-4 us
-- for an upsert of this row. No foreign key: a mark must never fail the report it rides
-- in (a token purged meanwhile), and the first mark of a token would pay a key check and
-- a row lock on device_tokens; the hygiene purge deletes a purged token's row here.
-- Token hygiene keeps reading last_seen_at: platforms accept sends to tokens of devices
-- long gone, so a delivery proves less than a registration.
CREATE TABLE token_deliveries (
    token_id     bigint PRIMARY KEY,
    delivered_on date   NOT NULL
);

INSERT INTO token_deliveries (token_id, delivered_on)
SELECT id, (last_delivered_at AT TIME ZONE 'UTC')::date
  FROM device_tokens
 WHERE last_delivered_at IS NOT NULL;

ALTER TABLE device_tokens DROP COLUMN last_delivered_at;
