-- pushfan 0002: what the fanout worker records beyond 0001's job ledger.

-- Progress of a broadcast: users in the audience (known once it is split into shards)
-- and users whose page was reported; tokens targeted per platform (what a dry run
-- reports); tokens parked on the retry topic and not yet resolved.
ALTER TABLE jobs
    ADD COLUMN audience_users   bigint,
    ADD COLUMN users_done       bigint NOT NULL DEFAULT 0,
    ADD COLUMN targeted_android bigint NOT NULL DEFAULT 0,
    ADD COLUMN targeted_ios     bigint NOT NULL DEFAULT 0,
    ADD COLUMN targeted_web     bigint NOT NULL DEFAULT 0,
    ADD COLUMN retrying         bigint NOT NULL DEFAULT 0;

-- `owner` fences a shard: whoever claimed it last (the worker Kafka gave its message to)
-- owns it, and a page report from an earlier owner changes nothing, so two workers never
-- both advance one shard's cursor.
ALTER TABLE job_shards
    ADD COLUMN owner       text,
    ADD COLUMN users       bigint NOT NULL DEFAULT 0,
    ADD COLUMN users_done  bigint NOT NULL DEFAULT 0,
    ADD COLUMN retrying    bigint NOT NULL DEFAULT 0;

-- Retry-topic batches already applied to the ledger: a batch redelivered after a crash is
-- recognised and not sent or counted twice.
CREATE TABLE job_retry_batches (
    job_id     text        NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    batch_id   text        NOT NULL,
    done_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, batch_id)
);

-- When a token last had a notification accepted by its platform. Written at most once a
-- day per token (a broadcast does not rewrite every row), and not indexed so the update
-- stays HOT. Token hygiene keeps reading last_seen_at: platforms accept sends to tokens of
-- devices long gone, so a delivery proves less than a registration.
ALTER TABLE device_tokens ADD COLUMN last_delivered_at timestamptz;
