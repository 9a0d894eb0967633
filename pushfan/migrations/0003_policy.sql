-- pushfan 0003: the delivery policy's durable state (issue #6).

-- A notification held back by quiet hours: one row per job and user, sent by the
-- worker's release scheduler once `release_at` has passed (the rows are claimed with
-- FOR UPDATE SKIP LOCKED, so several workers never release one twice) and deleted in
-- the transaction that records the release. `tokens` is what was held back (the
-- release sends to the user's tokens active then).
CREATE TABLE deferred_notifications (
    job_id      text        NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    user_id     text        NOT NULL,
    release_at  timestamptz NOT NULL,
    tokens      integer     NOT NULL,
    deferred_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, user_id)
);

CREATE INDEX deferred_notifications_due_idx ON deferred_notifications (release_at);

-- The job itself (its JSON), kept once one of its notifications is deferred: the release
-- scheduler renders it after the job's Kafka record is long committed.
ALTER TABLE jobs ADD COLUMN spec jsonb;

-- Low-priority notifications sent per user, for the frequency cap's rolling window; one
-- row per user and job, so a page sent again after a crash counts once. Rows older than
-- the window are pruned by the release scheduler.
CREATE TABLE low_priority_sends (
    user_id text        NOT NULL,
    job_id  text        NOT NULL,
    sent_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, job_id)
);

CREATE INDEX low_priority_sends_user_idx ON low_priority_sends (user_id, sent_at);
CREATE INDEX low_priority_sends_sent_idx ON low_priority_sends (sent_at);
