"""The release scheduler: notifications deferred by quiet hours, sent when they end.

Every worker runs one. Each round claims up to a page of due deferrals (``release_at``
passed by the worker's clock) with ``FOR UPDATE SKIP LOCKED`` inside a transaction that
stays open while they are sent, and deletes them in it while recording the counts: two
workers never release one deferral twice, and a worker that dies mid-send leaves its
rows to be claimed again (a crash resends at most that page, like a shard's).

A release goes through the page path: the user's tokens active now (a device logged out
meanwhile gets nothing), their preferences now (an opt-out since is respected), the
frequency cap, the senders, the report. Quiet hours are not looked at again: they have
ended. A deferral whose job has expired is not sent; it is counted ``expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
import pydantic
from asyncpg.pool import PoolConnectionProxy

from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from schemas import NotificationJob, decode_job
from worker.consumer import INFRA_ERRORS
from worker.fanout import Fanout
from worker.ledger import Counts, Held, log_low_sends, mark_delivered
from worker.report import Reporter
from worker.tokens import fetch_page_tokens

log = get_logger("pushfan.worker")

_CLAIM_SQL = """
SELECT job_id, user_id, tokens
  FROM deferred_notifications
 WHERE release_at <= $1
 ORDER BY release_at
 LIMIT $2
   FOR UPDATE SKIP LOCKED
"""

# The claimed rows go, the job's counts move, in one statement of the claiming
# transaction. Tokens were counted as targeted (and deferred) when their page was sent.
_RELEASED_SQL = f"""
WITH gone AS (
    DELETE FROM deferred_notifications WHERE job_id = $1 AND user_id = ANY($2::text[])
), used AS (
    {mark_delivered("$3")}
), low AS (
    {log_low_sends("$12", "$13")}
)
UPDATE jobs
   SET released = released + $4, sent = sent + $5, invalid = invalid + $6,
       failed = failed + $7, suppressed = suppressed + $8, capped = capped + $9,
       retrying = retrying + $10, expired = expired + $11, updated_at = now()
 WHERE job_id = $1
"""

PRUNE_EVERY_S = 60.0


class Releaser:
    """Releases due deferrals for one worker process until stopped."""

    def __init__(self, fanout: Fanout, reporter: Reporter, metrics: Metrics) -> None:
        self.fanout = fanout
        self.pool: asyncpg.Pool = fanout.pool
        self.reporter = reporter
        self.metrics = metrics
        self.settings = fanout.settings
        self._jobs: OrderedDict[str, NotificationJob | None] = OrderedDict()
        self._pruned = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Release rounds every ``release_interval_s`` (back to back while some are due)."""
        while not stop.is_set():
            try:
                while not stop.is_set() and await self.release_once():
                    pass
                await self._prune()
            except INFRA_ERRORS as exc:
                log.warning("release round failed; will retry", error=str(exc))
            except Exception:
                log.exception("release round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.release_interval_s)

    async def release_once(self) -> int:
        """Claim, send and record up to a page of due deferrals; returns how many."""
        now = self.fanout.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM_SQL, now, self.settings.page_size)
            groups: dict[str, list[asyncpg.Record]] = {}
            for row in rows:
                groups.setdefault(row["job_id"], []).append(row)
            for job_id, group in groups.items():
                await self._release(conn, job_id, group)
        return len(rows)

    async def _release(
        self, conn: PoolConnectionProxy, job_id: str, group: Sequence[asyncpg.Record]
    ) -> None:
        users = sorted(r["user_id"] for r in group)
        held_tokens = sum(r["tokens"] for r in group)
        job = await self._job(conn, job_id)
        now = self.fanout.clock()
        if job is None or job.is_expired(now):
            counts = Counts(expired=held_tokens) if job else Counts(failed=held_tokens)
            await self._record(conn, job_id, users, counts, [], Held())
            if counts.expired:
                # The rows hold a count, not the tokens: which platforms is not known.
                m = self.metrics
                m.child(m.policy, "unknown", "expired").inc(counts.expired)
            return
        tokens = await fetch_page_tokens(
            conn,
            users,
            job.type,
            self.fanout.wanted_platforms(job),
            cap_since=self.fanout.cap_since(job),
            job_id=job.job_id,
        )
        sent, held = await self.fanout.send_page(job, tokens, None, quiet=False)
        sent.counts.released = len(tokens)
        for platform, n in sent.counts.targeted.items():
            sent.policy[platform, "released"] += n
        await self.reporter.publish(sent)
        await self._record(conn, job_id, users, sent.counts, sent.delivered_ids, held)
        self.reporter.observe(sent)
        log.info("deferred notifications released", job_id=job_id, users=len(users))

    async def _record(
        self,
        conn: PoolConnectionProxy,
        job_id: str,
        users: list[str],
        c: Counts,
        delivered_ids: list[int],
        held: Held,
    ) -> None:
        await conn.execute(
            _RELEASED_SQL,
            job_id,
            users,
            delivered_ids,
            c.released,
            c.sent,
            c.invalid,
            c.failed,
            c.suppressed,
            c.capped,
            c.parked,
            c.expired,
            held.low_users,
            held.now,
        )

    async def _job(self, conn: PoolConnectionProxy, job_id: str) -> NotificationJob | None:
        """The deferred job, from the ledger (a few are cached); None if unreadable."""
        if job_id in self._jobs:
            self._jobs.move_to_end(job_id)
            return self._jobs[job_id]
        spec = await conn.fetchval("SELECT spec FROM jobs WHERE job_id = $1", job_id)
        job: NotificationJob | None = None
        try:
            job = decode_job(spec.encode()) if spec is not None else None
        except pydantic.ValidationError as exc:
            # Stored by this code from a valid job: only a schema change could do this.
            log.error("deferred job unreadable; its deferrals fail", job_id=job_id, error=str(exc))
        if spec is None:
            log.error("deferred job not stored; its deferrals fail", job_id=job_id)
        self._jobs[job_id] = job
        if len(self._jobs) > 64:
            self._jobs.popitem(last=False)
        return job

    async def _prune(self) -> None:
        """Drop frequency-cap rows older than the cap's window (now and then)."""
        if time.monotonic() - self._pruned < PRUNE_EVERY_S:
            return
        self._pruned = time.monotonic()
        oldest = self.fanout.clock() - timedelta(seconds=self.settings.low_cap_window_s)
        await self.pool.execute("DELETE FROM low_priority_sends WHERE sent_at < $1", oldest)
