"""Publishing jobs and following them: the broadcast's message, the warm-up that makes
every worker join the group, and watching the ledger until a job ends."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer

from bench.fanout.metrics import scrape, summed
from bench.fanout.seed import WARM_USER
from bench.fanout.workers import WorkerProcess
from pushfan.settings import Settings
from schemas import NotificationJob
from worker import ledger
from worker import status as job_status


def news_job(
    audience: dict[str, Any], job_id: str, platforms: Sequence[str] | None = None
) -> NotificationJob:
    """The message bench/senders.py sends, so both measure the same payload; with
    ``platforms``, to those platforms only."""
    now = datetime.now(UTC)
    spec: dict[str, Any] = {
        "job_id": job_id,
        "type": "news",
        "audience": audience,
        "payload": {"title": "Breaking", "body": "Something happened.", "data": {"k": "v"}},
        "created_at": now - timedelta(seconds=1),
        "expires_at": now + timedelta(hours=2),
    }
    if platforms is not None:
        spec["platforms"] = list(platforms)
    return NotificationJob.model_validate(spec)


async def until(
    what: str,
    check: Callable[[], Awaitable[object]],
    workers: Sequence[WorkerProcess],
    within: float,
) -> None:
    """Poll the coroutine function ``check`` until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        for w in workers:
            w.check_alive()
        if await check():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def warm_up(
    settings: Settings,
    conn: asyncpg.Connection,
    producer: AIOKafkaProducer,
    client: httpx.AsyncClient,
    workers: Sequence[WorkerProcess],
) -> int:
    """Single-user jobs on every partition, round after round, until every worker
    completed one in the same round: all have joined the group and hold partitions,
    their pools and HTTP/2 connections are open. Returns the rounds it took."""
    partitions = settings.kafka.topic_partitions
    tag = uuid.uuid4().hex[:6]

    async def completed_jobs() -> list[float]:
        return [
            summed(
                await scrape(client, w.metrics_port),
                "pushfan_worker_jobs_total",
                outcome="completed",
            )
            for w in workers
        ]

    for round_no in range(1, 21):
        before = await completed_jobs()
        ids: list[str] = []
        for p in range(partitions):
            job = news_job({"kind": "user", "user_id": WARM_USER}, f"warm-{tag}-{round_no}-{p}")
            await producer.send_and_wait(settings.kafka.topics.jobs, job.to_bytes(), partition=p)
            ids.append(job.job_id)

        async def all_done(ids: list[str] = ids) -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND state = 'completed'", ids
            )
            return bool(n == len(ids))

        await until("the warm-up jobs", all_done, workers, 120)
        after = await completed_jobs()
        if all(a > b for a, b in zip(after, before, strict=True)):
            return round_no
    raise RuntimeError("the workers did not all get partitions of the jobs topic")


@dataclass
class Progress:
    status: job_status.JobStatus  # final
    seconds: float  # from the publish to the ledger's final state
    split_s: float | None  # to the split into shards
    marks: dict[int, float]  # percent of the users reported -> seconds

    def steady(self, tokens: int) -> float | None:
        """Tokens/s between 10% and 90% of the users reported: the broadcast's pace
        without its start (publish, split, the first pages) and its tail."""
        if 10 not in self.marks or 90 not in self.marks or self.marks[90] <= self.marks[10]:
            return None
        return 0.8 * tokens / (self.marks[90] - self.marks[10])


async def watch(
    conn: asyncpg.Connection,
    job_id: str,
    t0: float,
    users: int,
    workers: Sequence[WorkerProcess],
) -> Progress:
    """Poll the ledger every 20 ms until the job is in a final state."""
    split_s: float | None = None
    marks: dict[int, float] = {}
    deadline = time.monotonic() + max(600.0, users / 250)
    while True:
        status = await job_status.status(conn, job_id)
        now = time.perf_counter()
        if status is not None:
            if split_s is None and status.shards_total is not None:
                split_s = now - t0
            for pct in (10, 50, 90):
                if pct not in marks and status.users_done * 100 >= users * pct:
                    marks[pct] = now - t0
            if status.state in ledger.FINAL_STATES:
                return Progress(status, now - t0, split_s, marks)
        for w in workers:
            w.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish")
        await asyncio.sleep(0.02)
