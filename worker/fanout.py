"""One range of an audience, page by page: resolve, fetch, policy, send, report.

The stages run in this order for every page; the next page is resolved and its tokens
fetched while the current one is sent, so the database and the platforms overlap. A page
is reported (events and parked tokens produced, then the ledger's cursor and counts in
one statement) before the next is sent. Stopping (SIGTERM, a rebalance) happens between
pages only, so a restart resends at most the page that was in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from enum import Enum

import asyncpg

from pushfan.metrics import Metrics
from pushfan.settings import WorkerSettings
from schemas import NotificationJob, Platform
from worker import ledger
from worker.audience import pages
from worker.dispatch import Dispatcher, Sent, Target
from worker.policy import decide
from worker.report import Reporter
from worker.tokens import PageToken, fetch_page_tokens

ALL_PLATFORMS: tuple[Platform, ...] = ("android", "ios", "web")


class End(Enum):
    DONE = "done"  # every page sent and reported
    STOPPED = "stopped"  # asked to stop between pages; resume from the cursor
    FENCED = "fenced"  # another worker claimed the shard
    EXPIRED = "expired"  # the job expired before its last page


class Fanout:
    """The page pipeline of one worker process."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        dispatcher: Dispatcher,
        reporter: Reporter,
        metrics: Metrics,
        settings: WorkerSettings,
        *,
        owner: str,
        platforms: tuple[Platform, ...] = ALL_PLATFORMS,
    ) -> None:
        self.pool = pool
        self.dispatcher = dispatcher
        self.reporter = reporter
        self.metrics = metrics
        self.settings = settings
        self.owner = owner
        self.platforms = platforms

    def _platforms(self, job: NotificationJob) -> list[Platform] | None:
        wanted = [p for p in (job.platforms or ALL_PLATFORMS) if p in self.platforms]
        return None if len(wanted) == len(ALL_PLATFORMS) else wanted

    async def run_range(
        self,
        job: NotificationJob,
        *,
        shard_no: int | None,
        after: str | None,
        until: str | None,
        stop: asyncio.Event,
    ) -> End:
        """Send every page of ``(after, until]``; ``shard_no`` None: an inline job."""
        platforms = self._platforms(job)
        users = pages(self.pool, job, after=after, until=until, page_size=self.settings.page_size)
        stage = self.metrics.stage_seconds

        async def load(it: AsyncIterator[list[str]]) -> tuple[list[str], list[PageToken]] | None:
            started = time.perf_counter()
            page = await anext(it, None)
            resolved = time.perf_counter()
            if page is None:
                return None
            tokens = (
                await fetch_page_tokens(self.pool, page, job.type, platforms)
                if platforms != []
                else []
            )
            self.metrics.child(stage, "resolve").observe(resolved - started)
            self.metrics.child(stage, "query").observe(time.perf_counter() - resolved)
            return page, tokens

        upcoming = asyncio.ensure_future(load(users))
        try:
            while True:
                loaded = await upcoming
                if loaded is None:
                    return End.DONE
                if stop.is_set():
                    return End.STOPPED
                if job.is_expired(datetime.now(UTC)):
                    return End.EXPIRED
                upcoming = asyncio.ensure_future(load(users))  # prefetch the next page
                page, tokens = loaded
                started = time.perf_counter()
                sent = await self._send(job, page, tokens, shard_no)
                sending = time.perf_counter()
                # Shielded: a page that was sent is reported even if the drain bound
                # cancels this task meanwhile.
                owned = await asyncio.shield(self._report(job, shard_no, page[-1], sent))
                self.metrics.child(stage, "send").observe(sending - started)
                self.metrics.child(stage, "report").observe(time.perf_counter() - sending)
                if not owned:
                    return End.FENCED
        finally:
            if not upcoming.done():
                upcoming.cancel()
                await asyncio.gather(upcoming, return_exceptions=True)
            await users.aclose()  # type: ignore[attr-defined]

    async def _send(
        self, job: NotificationJob, page: list[str], tokens: list[PageToken], shard_no: int | None
    ) -> Sent:
        decision = decide(job, tokens)
        targeted: dict[str, int] = {}
        for t in tokens:
            targeted[t.platform] = targeted.get(t.platform, 0) + 1
        if job.dry_run:
            sent = Sent()
        else:
            by_platform: dict[Platform, list[Target]] = {}
            for t in decision.send:
                by_platform.setdefault(t.platform, []).append((t.id, t.token))
            sent = await self.dispatcher.send(job, by_platform, shard_no=shard_no)
        sent.counts.users = len(page)
        sent.counts.targeted = targeted
        sent.counts.suppressed = decision.suppressed
        return sent

    async def _report(
        self, job: NotificationJob, shard_no: int | None, cursor: str, sent: Sent
    ) -> bool:
        await self.reporter.publish(sent)
        owned = await ledger.report_page(
            self.pool,
            job.job_id,
            shard_no,
            self.owner,
            cursor if shard_no is not None else None,
            sent.counts,
            sent.delivered_ids,
        )
        self.reporter.observe(sent)
        self.metrics.pages.inc()
        self.metrics.users_done.inc(sent.counts.users)
        return owned
