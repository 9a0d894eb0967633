"""``pushfan status JOB_ID``: a job's progress and counts, from the ledger."""

from __future__ import annotations

import json
from dataclasses import asdict

from worker.ledger import JobStatus

BAR = 30


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
        f" {s.suppressed:,}  deferred {s.deferred:,}  retrying {s.retrying:,}"
        f"  expired {s.expired:,}"
    )
    if s.error:
        lines.append(f"  error: {s.error}")
    return "\n".join(lines)


def as_json(s: JobStatus) -> str:
    data = asdict(s)
    data["progress"] = progress(s)
    return json.dumps(data, default=str, sort_keys=True)
