"""``pushfan cleanup``: deactivate the tokens the platforms reported dead.

Consumes the worker's invalid-token events (:class:`schemas.InvalidTokenEvent`) in
batches and deactivates each batch with one statement, recording the platform's reason
and the time. Race guard: a token registered again at or after the event's
``observed_at`` (the APNs 410 timestamp, else the send time) is left alone, since
``last_seen_at`` records the latest registration.

Offsets are committed only after the batch's statement committed: at-least-once, and
idempotent (an inactive token is not touched again). An event that does not parse is
logged by fingerprint-free reason, counted and skipped: it cannot become valid by
waiting. A database error stops the consumer without committing, so a restart re-reads
the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import pydantic
from aiokafka import AIOKafkaConsumer

from pushfan.kafka import make_consumer, start_client
from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from schemas import InvalidTokenEvent
from schemas.common import format_validation_error

GROUP_ID = "pushfan-cleanup"

DEACTIVATE_SQL = """
UPDATE device_tokens AS d
   SET is_active = false, deactivated_at = now(), deactivation_reason = e.reason,
       updated_at = now()
  FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS e(token, observed_at, reason)
 WHERE d.token = e.token AND d.is_active AND d.last_seen_at < e.observed_at
RETURNING e.reason
"""

log = get_logger("pushfan.cleanup")


@dataclass(frozen=True, slots=True)
class Dead:
    token: str
    observed_at: datetime
    reason: str


def latest_per_token(events: Iterable[InvalidTokenEvent]) -> list[Dead]:
    """One entry per token: its latest report (an UPDATE touches a row only once)."""
    latest: dict[str, InvalidTokenEvent] = {}
    for event in events:
        known = latest.get(event.token)
        if known is None or event.observed_at > known.observed_at:
            latest[event.token] = event
    return [Dead(e.token, e.observed_at, e.reason) for e in latest.values()]


async def deactivate(
    db: asyncpg.Pool | asyncpg.Connection, dead: list[Dead], metrics: Metrics | None = None
) -> int:
    """Deactivate what the race guard allows; returns how many tokens."""
    if not dead:
        return 0
    rows = await db.fetch(
        DEACTIVATE_SQL,
        [d.token for d in dead],
        [d.observed_at for d in dead],
        [d.reason for d in dead],
    )
    if metrics is not None:
        for row in rows:
            metrics.deactivations.labels(row["reason"]).inc()
    return len(rows)


def decode(raw: bytes | None, metrics: Metrics | None = None) -> InvalidTokenEvent | None:
    try:
        return InvalidTokenEvent.from_bytes(raw or b"")
    except pydantic.ValidationError as exc:
        log.warning(
            "skipping an invalid-token event that does not parse",
            error=format_validation_error(exc),
        )
        if metrics is not None:
            metrics.cleanup_skipped.inc()
        return None


async def consume(
    consumer: AIOKafkaConsumer,
    pool: asyncpg.Pool,
    metrics: Metrics,
    *,
    batch_size: int = 5000,
    stop: asyncio.Event | None = None,
) -> None:
    """Batches until ``stop`` is set: read, deactivate, then commit."""
    stop = stop or asyncio.Event()
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=500, max_records=batch_size)
        if not batches:
            continue
        events = [
            event
            for records in batches.values()
            for record in records
            if (event := decode(record.value, metrics)) is not None
        ]
        count = await deactivate(pool, latest_per_token(events), metrics)
        await consumer.commit()  # only now: the statement above has committed
        log.info("cleanup batch", events=len(events), deactivated=count)


async def run(
    settings: Settings, pool: asyncpg.Pool, metrics: Metrics, stop: asyncio.Event
) -> None:
    """The cleanup consumer of ``pushfan cleanup``, until ``stop``."""
    consumer = make_consumer(
        settings.kafka, settings.kafka.topics.invalid_tokens, group_id=GROUP_ID
    )
    await start_client(consumer, settings.kafka)
    try:
        await consume(
            consumer, pool, metrics, batch_size=settings.hygiene.cleanup_batch_size, stop=stop
        )
    finally:
        await consumer.stop()
