-- pushfan 0001: device tokens, preferences, segments and the job ledger.
-- Applied by `pushfan migrate` inside one transaction; never edit an applied migration,
-- add the next number instead (the runner refuses a changed checksum).

-- One row per token: a token belongs to exactly one user, so registering it for another
-- user moves the row (INSERT ... ON CONFLICT (token) DO UPDATE SET user_id = ...).
CREATE TABLE device_tokens (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token               text        NOT NULL,
    user_id             text        NOT NULL,
    platform            text        NOT NULL,
    device_id           text,
    app_id              text        NOT NULL DEFAULT '',
    app_version         text,
    locale              text,
    time_zone           text,
    is_active           boolean     NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- Changes on every (re-)registration; the cleanup consumer compares an invalid-token
    -- report's time with it so a token registered again after a failed send survives.
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- Last sign of life (registration or successful send); token hygiene reads it.
    last_seen_at        timestamptz NOT NULL DEFAULT now(),
    deactivated_at      timestamptz,
    deactivation_reason text,
    CONSTRAINT device_tokens_token_key UNIQUE (token),
    CONSTRAINT device_tokens_platform_check CHECK (platform IN ('ios', 'android', 'web')),
    -- Real tokens are 64 (APNs) to ~200 (FCM) characters; 1024 keeps every token under
    -- the 2704-byte b-tree entry limit of the unique index.
    CONSTRAINT device_tokens_token_length CHECK (length(token) BETWEEN 1 AND 1024),
    CONSTRAINT device_tokens_user_id_length CHECK (length(user_id) BETWEEN 1 AND 128),
    CONSTRAINT device_tokens_inactive_has_time CHECK (is_active OR deactivated_at IS NOT NULL)
);

-- The page query (`user_id = ANY($1) AND is_active`) and keyset paging over users with an
-- active token both read this index only: user_id leads, the columns a send needs ride along.
CREATE INDEX device_tokens_active_user_idx
    ON device_tokens (user_id) INCLUDE (platform, id, token)
    WHERE is_active;

-- A device (one install of one app) has at most one active token: a refreshed token
-- replaces the old one of that device.
CREATE UNIQUE INDEX device_tokens_active_device_idx
    ON device_tokens (app_id, device_id)
    WHERE is_active AND device_id IS NOT NULL;

-- Token hygiene: active tokens not seen for N days.
CREATE INDEX device_tokens_active_last_seen_idx
    ON device_tokens (last_seen_at)
    WHERE is_active;

-- Purge of deactivated rows after the retention period.
CREATE INDEX device_tokens_inactive_idx
    ON device_tokens (deactivated_at)
    WHERE NOT is_active;

-- Per-user delivery settings: quiet hours in the user's own time zone.
CREATE TABLE user_preferences (
    user_id       text        PRIMARY KEY,
    time_zone     text        NOT NULL DEFAULT 'UTC',
    quiet_start   time,
    quiet_end     time,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT user_preferences_quiet_both CHECK ((quiet_start IS NULL) = (quiet_end IS NULL))
);

-- Per-user, per-notification-type opt-out. No row means push is on.
CREATE TABLE notification_preferences (
    user_id           text        NOT NULL,
    notification_type text        NOT NULL,
    push_enabled      boolean     NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, notification_type)
);

-- Segment membership; the primary key serves keyset paging of one segment by user_id.
CREATE TABLE segment_members (
    segment    text        NOT NULL,
    user_id    text        NOT NULL,
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (segment, user_id)
);

-- The job ledger: one row per job_id (the idempotency key).
CREATE TABLE jobs (
    job_id        text        PRIMARY KEY,
    type          text        NOT NULL,
    priority      text        NOT NULL,
    audience_kind text        NOT NULL,
    campaign_id   text,
    dry_run       boolean     NOT NULL DEFAULT false,
    state         text        NOT NULL DEFAULT 'pending',
    error         text,
    expires_at    timestamptz,
    shards_total  integer,
    shards_done   integer     NOT NULL DEFAULT 0,
    targeted      bigint      NOT NULL DEFAULT 0,
    sent          bigint      NOT NULL DEFAULT 0,
    invalid       bigint      NOT NULL DEFAULT 0,
    failed        bigint      NOT NULL DEFAULT 0,
    deferred      bigint      NOT NULL DEFAULT 0,
    suppressed    bigint      NOT NULL DEFAULT 0,
    capped        bigint      NOT NULL DEFAULT 0,
    expired       bigint      NOT NULL DEFAULT 0,
    released      bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    CONSTRAINT jobs_priority_check CHECK (priority IN ('urgent', 'normal', 'low')),
    CONSTRAINT jobs_audience_kind_check CHECK (audience_kind IN ('user', 'users', 'segment', 'all')),
    CONSTRAINT jobs_state_check
        CHECK (state IN ('pending', 'running', 'completed', 'failed', 'expired', 'dead_lettered'))
);

CREATE INDEX jobs_unfinished_idx ON jobs (created_at) WHERE state IN ('pending', 'running');

-- A shard is a user_id range of one job's audience, worked by any worker of the group.
-- `cursor` is the last user_id whose page was fully reported: a restart resumes after it,
-- so a crash resends at most the page that was in flight.
CREATE TABLE job_shards (
    job_id        text        NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    shard_no      integer     NOT NULL,
    range_start   text,
    range_end     text,
    cursor        text,
    state         text        NOT NULL DEFAULT 'pending',
    pages_done    integer     NOT NULL DEFAULT 0,
    targeted      bigint      NOT NULL DEFAULT 0,
    sent          bigint      NOT NULL DEFAULT 0,
    invalid       bigint      NOT NULL DEFAULT 0,
    failed        bigint      NOT NULL DEFAULT 0,
    deferred      bigint      NOT NULL DEFAULT 0,
    suppressed    bigint      NOT NULL DEFAULT 0,
    capped        bigint      NOT NULL DEFAULT 0,
    expired       bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    PRIMARY KEY (job_id, shard_no),
    CONSTRAINT job_shards_state_check CHECK (state IN ('pending', 'running', 'completed', 'failed'))
);
