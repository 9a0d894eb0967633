"""``pushfan status JOB_ID``: a job's progress and counts, from the ledger."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

import asyncpg

BAR = 30


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_id: str
    type: str
    state: str
    dry_run: bool
    audience_kind: str
    audience_users: int | None
    users_done: int
    shards_total: int | None
    shards_done: int
    targeted: int
    targeted_by_platform: dict[str, int]
    sent: int
    invalid: int
    failed: int
    suppressed: int
    deferred: int
    released: int
    waiting: int  # users whose deferred notification is not released yet
    capped: int
    retrying: int
    expired: int
    error: str | None
    created_at: datetime
    completed_at: datetime | None


async def status(db: asyncpg.Pool | asyncpg.Connection, job_id: str) -> JobStatus | None:
    """The ledger's view of one job, or None if it was never consumed."""
    r = await db.fetchrow(
        "SELECT j.*, (SELECT count(*) FROM deferred_notifications d"
        " WHERE d.job_id = j.job_id) AS waiting FROM jobs j WHERE j.job_id = $1",
        job_id,
    )
    if r is None:
        return None
    return JobStatus(
        job_id=r["job_id"],
        type=r["type"],
        state=r["state"],
        dry_run=r["dry_run"],
        audience_kind=r["audience_kind"],
        audience_users=r["audience_users"],
        users_done=r["users_done"],
        shards_total=r["shards_total"],
        shards_done=r["shards_done"],
        targeted=r["targeted"],
        targeted_by_platform={
            "android": r["targeted_android"],
            "ios": r["targeted_ios"],
            "web": r["targeted_web"],
        },
        sent=r["sent"],
        invalid=r["invalid"],
        failed=r["failed"],
        suppressed=r["suppressed"],
        deferred=r["deferred"],
        released=r["released"],
        waiting=r["waiting"],
        capped=r["capped"],
        retrying=r["retrying"],
        expired=r["expired"],
        error=r["error"],
        created_at=r["created_at"],
        completed_at=r["completed_at"],
    )


def progress(s: JobStatus) -> float | None:
    """Share of the audience's users done (0..1); None before the audience is known."""
    if s.state == "completed":
        return 1.0
    if not s.audience_users:
        return None
    return min(1.0, s.users_done / s.audience_users)


def render(s: JobStatus) -> str:
    """A few lines for a person: state, a progress bar while a broadcast runs, counts."""
    kind = "dry run" if s.dry_run else s.audience_kind
    lines = [f"job {s.job_id} ({s.type}, {kind}): {s.state}"]
    share = progress(s)
    if share is not None:
        filled = round(share * BAR)
        users = f"{s.users_done:,}" + (f" / {s.audience_users:,}" if s.audience_users else "")
        shards = f"   shards {s.shards_done}/{s.shards_total}" if s.shards_total else ""
        lines.append(
            f"  [{'#' * filled}{'.' * (BAR - filled)}] {share:4.0%}  {users} users{shards}"
        )
    per = ", ".join(f"{p} {n:,}" for p, n in s.targeted_by_platform.items() if n)
    lines.append(f"  targeted   {s.targeted:,}" + (f" ({per})" if per else ""))
    lines.append(
        f"  sent {s.sent:,}  invalid {s.invalid:,}  failed {s.failed:,}  suppressed"
        f" {s.suppressed:,}  capped {s.capped:,}  retrying {s.retrying:,}"
        f"  expired {s.expired:,}"
    )
    if s.deferred:
        lines.append(
            f"  deferred by quiet hours {s.deferred:,} tokens: released {s.released:,},"
            f" {s.waiting:,} users still waiting"
        )
    if s.error:
        lines.append(f"  error: {s.error}")
    return "\n".join(lines)


def as_json(s: JobStatus) -> str:
    data = asdict(s)
    data["progress"] = progress(s)
    return json.dumps(data, default=str, sort_keys=True)
