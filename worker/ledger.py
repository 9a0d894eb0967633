"""The job ledger in PostgreSQL: job state, shards, per-page progress and counts.

``job_id`` is the idempotency key. A job row is created when a job is first consumed;
a job found ``completed``, ``expired`` or ``dead_lettered`` again is skipped. A page's
counts and its shard's cursor move in one statement, so a restart resumes after the last
page reported and counts each page once. Shards are fenced by ``owner``: the latest
claim wins and reports from an earlier owner change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from schemas import NotificationJob
from worker.audience import Shard

FINAL_STATES = frozenset({"completed", "expired", "dead_lettered"})

_BEGIN_SQL = """
WITH new AS (
    INSERT INTO jobs (job_id, type, priority, audience_kind, campaign_id, dry_run,
                      expires_at, state, started_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, 'running', now())
    ON CONFLICT (job_id) DO NOTHING
    RETURNING state, shards_total
)
SELECT state, shards_total, true AS created FROM new
UNION ALL
SELECT state, shards_total, false FROM jobs WHERE job_id = $1 AND NOT EXISTS (SELECT 1 FROM new)
"""


@dataclass(frozen=True, slots=True)
class JobRow:
    state: str
    shards_total: int | None
    created: bool


async def begin(db: asyncpg.Pool, job: NotificationJob) -> JobRow:
    """The job's ledger row, created as ``running`` if this is its first delivery."""
    row = await db.fetchrow(
        _BEGIN_SQL,
        job.job_id,
        job.type,
        job.priority,
        job.audience.kind,
        job.campaign_id,
        job.dry_run,
        job.expires_at,
    )
    if row is None:
        # Another worker inserted it after this statement's snapshot was taken.
        row = await db.fetchrow(
            "SELECT state, shards_total, false AS created FROM jobs WHERE job_id = $1",
            job.job_id,
        )
    assert row is not None
    return JobRow(row["state"], row["shards_total"], row["created"])


async def finish(db: asyncpg.Pool, job_id: str, state: str, error: str | None = None) -> None:
    """Set a final state (``completed``, ``expired``), unless one is set already."""
    await db.execute(
        "UPDATE jobs SET state = $2, error = coalesce($3, error), completed_at = now(),"
        " updated_at = now() WHERE job_id = $1 AND state NOT IN ('completed', 'expired')",
        job_id,
        state,
        error,
    )


async def create_shards(db: asyncpg.Pool, job_id: str, shards: Sequence[Shard]) -> None:
    """Record a split: the shard rows and the job's shard total and audience size."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO job_shards (job_id, shard_no, range_start, range_end, users)"
            " SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[], $5::bigint[])"
            " ON CONFLICT DO NOTHING",
            job_id,
            [s.shard_no for s in shards],
            [s.after for s in shards],
            [s.until for s in shards],
            [s.users for s in shards],
        )
        await conn.execute(
            "UPDATE jobs SET shards_total = $2, audience_users = $3, updated_at = now()"
            " WHERE job_id = $1",
            job_id,
            len(shards),
            sum(s.users for s in shards),
        )


async def open_shards(db: asyncpg.Pool, job_id: str) -> list[Shard]:
    """The shards of a split job that are not completed yet."""
    rows = await db.fetch(
        "SELECT shard_no, range_start, range_end, users FROM job_shards"
        " WHERE job_id = $1 AND state <> 'completed' ORDER BY shard_no",
        job_id,
    )
    return [Shard(r[0], r[1], r[2], r[3]) for r in rows]


@dataclass(frozen=True, slots=True)
class Claim:
    completed: bool
    cursor: str | None


async def claim(db: asyncpg.Pool, job_id: str, shard_no: int, owner: str) -> Claim | None:
    """Take the shard over (the latest claim wins); None if the shard is unknown."""
    row = await db.fetchrow(
        "UPDATE job_shards SET owner = $3,"
        " state = CASE WHEN state = 'completed' THEN state ELSE 'running' END,"
        " updated_at = now() WHERE job_id = $1 AND shard_no = $2"
        " RETURNING state = 'completed', cursor",
        job_id,
        shard_no,
        owner,
    )
    return None if row is None else Claim(row[0], row[1])


@dataclass(slots=True)
class Counts:
    """What happened to one page's (or retry batch's) tokens."""

    users: int = 0
    targeted: dict[str, int] = field(default_factory=dict)  # per platform
    sent: int = 0
    invalid: int = 0
    failed: int = 0
    suppressed: int = 0
    parked: int = 0
    expired: int = 0
    deferred: int = 0
    capped: int = 0
    released: int = 0


@dataclass(slots=True)
class Held:
    """What a page leaves behind for later: users deferred by quiet hours (user_id ->
    (release time, tokens)), and the users a ``low`` job reached (the frequency cap's
    log), at ``now`` by the worker's clock."""

    job: NotificationJob | None = None  # stored with the first deferral
    deferred: dict[str, tuple[datetime, int]] = field(default_factory=dict)
    low_users: list[str] = field(default_factory=list)
    now: datetime | None = None


# A token's delivery day: the date in UTC, whatever the session's time zone.
UTC_TODAY = "(now() AT TIME ZONE 'UTC')::date"


def mark_delivered(ids: str, gate: str = "true") -> str:
    """A CTE body: the tokens whose ids are the ``bigint[]`` parameter ``ids`` had a
    notification accepted today (UTC), where ``gate`` holds. ``token_deliveries`` keeps
    a day per token, so a token's row is written at most once a day however many
    notifications reach it; repeated ids are one mark."""
    return (
        "INSERT INTO token_deliveries (token_id, delivered_on)"
        f" SELECT DISTINCT i, {UTC_TODAY} FROM unnest({ids}::bigint[]) AS i"
        f" WHERE {gate}"
        " ON CONFLICT (token_id) DO UPDATE SET delivered_on = excluded.delivered_on"
        " WHERE token_deliveries.delivered_on < excluded.delivered_on"
    )


def log_low_sends(users: str, at: str, gate: str = "true") -> str:
    """A CTE body: job ``$1`` sent a low-priority notification at ``at`` to each user of
    the ``text[]`` parameter ``users`` (the frequency cap's log), once per user and job,
    where ``gate`` holds."""
    return (
        "INSERT INTO low_priority_sends (user_id, job_id, sent_at)"
        f" SELECT u, $1, {at} FROM unnest({users}::text[]) AS u WHERE {gate}"
        " ON CONFLICT DO NOTHING"
    )


_OWNED = "($15 OR EXISTS (SELECT 1 FROM shard))"

# One round trip per page: the delivered tokens' usage, the shard's cursor and counts
# (fenced by owner), the job's counts, the page's deferrals and low-priority sends.
# Data-modifying CTEs all run; what moves counts or stores deferrals is gated on the
# shard's update, so a fenced-off owner changes nothing that counts.
_REPORT_SQL = f"""
WITH used AS (
    {mark_delivered("$16")}
), shard AS (
    UPDATE job_shards
       SET cursor = coalesce($4, cursor), pages_done = pages_done + 1,
           users_done = users_done + $5, targeted = targeted + $6 + $7 + $8,
           sent = sent + $9, invalid = invalid + $10, failed = failed + $11,
           suppressed = suppressed + $12, retrying = retrying + $13,
           expired = expired + $14, deferred = deferred + $17, capped = capped + $18,
           updated_at = now()
     WHERE job_id = $1 AND shard_no = $2 AND owner = $3
    RETURNING 1
), held AS (
    INSERT INTO deferred_notifications (job_id, user_id, release_at, tokens)
    SELECT $1, u, r, n FROM unnest($19::text[], $20::timestamptz[], $21::int[]) AS x(u, r, n)
     WHERE {_OWNED}
    ON CONFLICT DO NOTHING
), low AS (
    {log_low_sends("$22", "$23", _OWNED)}
)
UPDATE jobs
   SET users_done = users_done + $5, targeted = targeted + $6 + $7 + $8,
       targeted_android = targeted_android + $6, targeted_ios = targeted_ios + $7,
       targeted_web = targeted_web + $8, sent = sent + $9, invalid = invalid + $10,
       failed = failed + $11, suppressed = suppressed + $12, retrying = retrying + $13,
       expired = expired + $14, deferred = deferred + $17, capped = capped + $18,
       spec = coalesce(spec, $24::jsonb), updated_at = now()
 WHERE job_id = $1 AND {_OWNED}
RETURNING 1
"""


def _count_args(c: Counts) -> list[object]:
    t = c.targeted
    return [
        c.users,
        t.get("android", 0),
        t.get("ios", 0),
        t.get("web", 0),
        c.sent,
        c.invalid,
        c.failed,
        c.suppressed,
        c.parked,
        c.expired,
    ]


async def report_page(
    db: asyncpg.Pool,
    job_id: str,
    shard_no: int | None,
    owner: str,
    cursor: str | None,
    counts: Counts,
    delivered_ids: Sequence[int],
    held: Held | None = None,
) -> bool:
    """Record a page; False if another worker owns the shard now (stop sending it).

    ``shard_no`` None is a job sent inline, without shards: only the job's counts move.
    ``held``: the page's deferrals (stored, with the job the first time) and low-priority
    sends, recorded in the same statement, each once however often the page is sent.
    """
    held = held or Held()
    deferred = held.deferred
    spec = held.job.to_bytes().decode() if held.job is not None and deferred else None
    row = await db.fetchrow(
        _REPORT_SQL,
        job_id,
        -1 if shard_no is None else shard_no,
        owner,
        cursor,
        *_count_args(counts),
        shard_no is None,
        list(delivered_ids),
        counts.deferred,
        counts.capped,
        list(deferred),
        [at for at, _ in deferred.values()],
        [n for _, n in deferred.values()],
        held.low_users,
        held.now,
        spec,
    )
    return row is not None


_COMPLETE_SHARD_SQL = """
WITH shard AS (
    UPDATE job_shards SET state = 'completed', completed_at = now(), updated_at = now()
     WHERE job_id = $1 AND shard_no = $2 AND owner = $3 AND state <> 'completed'
    RETURNING 1
)
UPDATE jobs
   SET shards_done = shards_done + 1, updated_at = now(),
       state = CASE WHEN shards_done + 1 >= shards_total AND state = 'running'
                    THEN 'completed' ELSE state END,
       completed_at = CASE WHEN shards_done + 1 >= shards_total THEN now() END
 WHERE job_id = $1 AND EXISTS (SELECT 1 FROM shard)
RETURNING state
"""


async def complete_shard(db: asyncpg.Pool, job_id: str, shard_no: int, owner: str) -> str | None:
    """Mark the shard done; returns the job's state after it (None if already done or
    fenced off). The last shard completes the job."""
    return await db.fetchval(_COMPLETE_SHARD_SQL, job_id, shard_no, owner)  # type: ignore[no-any-return]


_APPLY_RETRY_SQL = f"""
WITH batch AS (
    INSERT INTO job_retry_batches (job_id, batch_id) VALUES ($1, $2)
    ON CONFLICT DO NOTHING
    RETURNING 1
), used AS (
    {mark_delivered("$9", "EXISTS (SELECT 1 FROM batch)")}
)
UPDATE jobs
   SET sent = sent + $3, invalid = invalid + $4, failed = failed + $5,
       retrying = retrying - $6 + $7, expired = expired + $8, updated_at = now()
 WHERE job_id = $1 AND EXISTS (SELECT 1 FROM batch)
RETURNING 1
"""


async def retry_applied(db: asyncpg.Pool, job_id: str, batch_id: str) -> bool:
    """Whether a retry batch was sent and recorded already."""
    found = await db.fetchval(
        "SELECT 1 FROM job_retry_batches WHERE job_id = $1 AND batch_id = $2", job_id, batch_id
    )
    return found is not None


async def apply_retry(
    db: asyncpg.Pool,
    job_id: str,
    batch_id: str,
    resolved: int,
    counts: Counts,
    delivered_ids: Sequence[int],
) -> bool:
    """Record a retry batch's outcome once: ``resolved`` tokens leave ``retrying``,
    ``counts.parked`` of them went back to the retry topic. False if recorded before."""
    row = await db.fetchrow(
        _APPLY_RETRY_SQL,
        job_id,
        batch_id,
        counts.sent,
        counts.invalid,
        counts.failed,
        resolved,
        counts.parked,
        counts.expired,
        list(delivered_ids),
    )
    return row is not None
