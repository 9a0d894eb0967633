"""Helpers for the worker's end-to-end tests: topics of their own, tokens, jobs, workers.

Everything is real: the session's broker and PostgreSQL, the FCM and APNs emulators, and
``worker.main.run`` as ``pushfan worker`` runs it (in-process, or as a subprocess where a
test kills it).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
from aiokafka import ConsumerRecord

from pushfan.emulators.runner import Emulators
from pushfan.kafka import assign_all, ensure_topics, make_consumer, make_producer, start_client
from pushfan.metrics import Metrics
from pushfan.settings import Settings, TopicSettings
from schemas import NotificationJob
from worker import ledger
from worker import status as job_status
from worker.fanout import Clock, utc_now
from worker.main import run

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


def tag() -> str:
    """A short unique name for one test's users, tokens and segments."""
    return uuid.uuid4().hex[:8]


def fcm_token(tag: str, i: int) -> str:
    return f"{tag}{i:09d}:APA91b{'x' * 120}"


def apns_token(tag: str, i: int) -> str:
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"{tag}/{i}").hex
    return (digest * 2)[:64]


async def own_topics(settings: Settings, partitions: int = 4) -> Settings:
    """``settings`` with topics (and a consumer group) no other test uses, created."""
    prefix = f"w-{uuid.uuid4().hex[:8]}."
    kafka = settings.kafka.model_copy(
        update={"topics": TopicSettings.prefixed(prefix), "topic_partitions": partitions}
    )
    worker = settings.worker.model_copy(
        update={"group_id": f"{prefix}workers", "metrics_port": 0, "drain_timeout_s": 5.0}
    )
    out = settings.model_copy(update={"kafka": kafka, "worker": worker})
    await ensure_topics(out.kafka)
    return out


def with_worker(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=changes)})


async def add_tokens(
    db: asyncpg.Pool, rows: Iterable[tuple[str, str, str]], *, active: bool = True
) -> list[int]:
    """Insert ``(user_id, platform, token)`` rows straight into device_tokens; their ids."""
    users, platforms, tokens = (list(c) for c in zip(*rows, strict=True))
    fetched = await db.fetch(
        "INSERT INTO device_tokens (user_id, platform, token, is_active, deactivated_at)"
        " SELECT u, p, t, $4, CASE WHEN $4 THEN NULL ELSE now() END"
        " FROM unnest($1::text[], $2::text[], $3::text[]) AS x(u, p, t) RETURNING id",
        users,
        platforms,
        tokens,
        active,
    )
    return [r[0] for r in fetched]


async def add_segment(db: asyncpg.Pool, segment: str, user_ids: Sequence[str]) -> None:
    await db.execute(
        "INSERT INTO segment_members (segment, user_id) SELECT $1, unnest($2::text[])",
        segment,
        list(user_ids),
    )


def make_job(audience: dict[str, Any], **fields: Any) -> NotificationJob:
    now = datetime.now(UTC)
    spec: dict[str, Any] = {
        "job_id": f"job-{uuid.uuid4().hex[:12]}",
        "type": "order_shipped",
        "audience": audience,
        "payload": {"title": "Your order has shipped", "body": "On its way."},
        "created_at": now - timedelta(seconds=1),
        "expires_at": now + timedelta(hours=1),
    }
    spec.update(fields)
    return NotificationJob.model_validate(spec)


async def publish(settings: Settings, *values: bytes | NotificationJob) -> None:
    """Produce jobs (or raw bytes) to the jobs topic, in order, on one partition."""
    producer = make_producer(settings.kafka)
    await start_client(producer, settings.kafka)
    try:
        for value in values:
            raw = value.to_bytes() if isinstance(value, NotificationJob) else value
            await producer.send_and_wait(settings.kafka.topics.jobs, raw, key=b"k")
    finally:
        await producer.stop()


class FakeClock:
    """A worker clock the test moves (the policy's and expiry's now; Kafka, the database
    and the emulators keep real time)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, now: datetime) -> None:
        self.now = now


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, metrics: Metrics | None = None, clock: Clock | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """``pushfan worker`` in this process until the block ends (then a graceful stop)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop, metrics or Metrics(), clock=clock or utc_now))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def wait_for_job(
    db: asyncpg.Pool, job_id: str, *, within: float = 60, states: frozenset[str] | None = None
) -> job_status.JobStatus:
    """The job's ledger row once it reaches a final state (or one of ``states``)."""
    wanted = states or ledger.FINAL_STATES
    async with asyncio.timeout(within):
        while True:
            found = await job_status.status(db, job_id)
            if found is not None and found.state in wanted:
                return found
            await asyncio.sleep(0.1)


def deliveries(emulators: Emulators) -> dict[str, int]:
    """Deliveries per token, both platforms."""
    return {**emulators.fcm.script.delivered, **emulators.apns.script.delivered}


async def read_records(
    settings: Settings, topic: str, count: int | None = None, within: float = 30
) -> list[Record]:
    """The first ``count`` records of ``topic`` (all partitions), read without a group;
    ``count`` None: every record the topic holds now."""
    consumer = make_consumer(settings.kafka, group_id=None)
    await start_client(consumer, settings.kafka)
    out: list[Record] = []
    try:
        await assign_all(consumer, topic)
        if count is None:
            count = sum((await consumer.end_offsets(list(consumer.assignment()))).values())
        async with asyncio.timeout(within):
            while len(out) < count:
                polled = await consumer.getmany(timeout_ms=200)
                out.extend(r for records in polled.values() for r in records)
    finally:
        await consumer.stop()
    return out


async def read_topic(settings: Settings, topic: str, count: int, within: float = 30) -> list[bytes]:
    """The first ``count`` values of ``topic`` (all partitions), read without a group."""
    return [r.value or b"" for r in await read_records(settings, topic, count, within)]


async def until_none_active(db: asyncpg.Pool, tokens: Iterable[str], *, within: float = 30) -> None:
    """Until none of ``tokens`` is active (the cleanup consumer deactivated them)."""
    wanted = sorted(tokens)
    sql = "SELECT count(*) FROM device_tokens WHERE token = ANY($1) AND is_active"
    async with asyncio.timeout(within):
        while True:
            if not await db.fetchval(sql, wanted):
                return
            await asyncio.sleep(0.1)


async def eventually(
    check: Callable[[], Awaitable[object] | object], *, within: float = 30, every: float = 0.05
) -> object:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    async with asyncio.timeout(within):
        while True:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(every)
