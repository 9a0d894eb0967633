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
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from enum import Enum

import asyncpg

from pushfan.metrics import Metrics
from pushfan.settings import WorkerSettings
from schemas import AllAudience, NotificationJob, Platform
from worker import ledger
from worker.audience import pages
from worker.dispatch import Dispatcher, Sent, Target
from worker.policy import decide
from worker.report import Reporter
from worker.tokens import PageToken, fetch_page_tokens, fetch_span_tokens

ALL_PLATFORMS: tuple[Platform, ...] = ("android", "ios", "web")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


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
        clock: Clock = utc_now,
    ) -> None:
        """``clock``: what the policy and expiry take as now (tests move it)."""
        self.pool = pool
        self.clock = clock
        self.dispatcher = dispatcher
        self.reporter = reporter
        self.metrics = metrics
        self.settings = settings
        self.owner = owner
        self.platforms = platforms

    def wanted_platforms(self, job: NotificationJob) -> list[Platform] | None:
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
        platforms = self.wanted_platforms(job)
        users = pages(self.pool, job, after=after, until=until, page_size=self.settings.page_size)
        stage = self.metrics.stage_seconds
        # An "all" page is every user with a token in (previous page's last, its own last]:
        # its tokens are read as that range (see fetch_span_tokens).
        spans = isinstance(job.audience, AllAudience)
        below = after or ""

        async def load(it: AsyncIterator[list[str]]) -> tuple[list[str], list[PageToken]] | None:
            nonlocal below
            started = time.perf_counter()
            page = await anext(it, None)
            resolved = time.perf_counter()
            if page is None:
                return None
            lo, below = below, page[-1]
            cap_since = self.cap_since(job)
            if platforms == []:
                tokens: list[PageToken] = []
            elif spans:
                tokens = await fetch_span_tokens(
                    self.pool,
                    lo,
                    page[-1],
                    job.type,
                    platforms,
                    cap_since=cap_since,
                    job_id=job.job_id,
                )
            else:
                tokens = await fetch_page_tokens(
                    self.pool, page, job.type, platforms, cap_since=cap_since, job_id=job.job_id
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
                if job.is_expired(self.clock()):
                    return End.EXPIRED
                upcoming = asyncio.ensure_future(load(users))  # prefetch the next page
                page, tokens = loaded
                started = time.perf_counter()
                sent, held = await self.send_page(job, tokens, shard_no)
                sent.counts.users = len(page)
                sending = time.perf_counter()
                # Shielded: a page that was sent is reported even if the drain bound
                # cancels this task meanwhile.
                owned = await asyncio.shield(self._report(job, shard_no, page[-1], sent, held))
                self.metrics.child(stage, "send").observe(sending - started)
                self.metrics.child(stage, "report").observe(time.perf_counter() - sending)
                if not owned:
                    return End.FENCED
        finally:
            if not upcoming.done():
                upcoming.cancel()
                await asyncio.gather(upcoming, return_exceptions=True)
            await users.aclose()  # type: ignore[attr-defined]

    def cap_since(self, job: NotificationJob) -> datetime | None:
        """Start of the frequency cap's window for ``job``; None: no cap applies."""
        w = self.settings
        if job.priority != "low" or not w.low_cap:
            return None
        return self.clock() - timedelta(seconds=w.low_cap_window_s)

    async def send_page(
        self,
        job: NotificationJob,
        tokens: list[PageToken],
        shard_no: int | None,
        *,
        quiet: bool = True,
    ) -> tuple[Sent, ledger.Held]:
        """Policy, then send: what happened to the tokens, and what is left for later
        (deferrals, the cap's log). ``quiet`` False: a release, quiet hours are over."""
        now = self.clock()
        decision = decide(job, tokens, now, cap=self.settings.low_cap, quiet=quiet)
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
        c = sent.counts
        c.targeted = targeted
        c.suppressed = decision.suppressed
        c.capped = decision.capped
        c.deferred = decision.deferred_tokens
        sent.policy.update(decision.held)
        # A dry run counts what would wait, and stores nothing to send later.
        held = ledger.Held(job=job, deferred={} if job.dry_run else decision.deferred, now=now)
        if job.priority == "low" and self.settings.low_cap and not job.dry_run:
            held.low_users = sorted({t.user_id for t in decision.send})
        return sent, held

    async def _report(
        self,
        job: NotificationJob,
        shard_no: int | None,
        cursor: str,
        sent: Sent,
        held: ledger.Held,
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
            held,
        )
        self.reporter.observe(sent)
        self.metrics.pages.inc()
        if owned:  # a page fenced off is counted by the shard's new owner, who sends it
            mode = "inline" if shard_no is None else "split"
            self.metrics.child(self.metrics.users_done, mode).inc(sent.counts.users)
        return owned
