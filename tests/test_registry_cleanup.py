"""The cleanup consumer through the real broker, and token hygiene, on the real database."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from pushfan.kafka import assign_all, ensure_topics, make_consumer, make_producer, start_client
from pushfan.metrics import Metrics
from pushfan.settings import HygieneSettings, KafkaSettings, Settings
from registry import cleanup, hygiene, store
from registry.store import Registration
from schemas import InvalidTokenEvent


@pytest.fixture
def group() -> str:
    """A consumer group of its own per test: joining one whose last member just left
    waits out a rebalance."""
    return f"{cleanup.GROUP_ID}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def kafka(settings: Settings) -> KafkaSettings:
    """A topic of its own per test, so offsets and events never mix."""
    topics = settings.kafka.topics.model_copy(
        update={"invalid_tokens": f"{settings.kafka.topics.invalid_tokens}.{uuid.uuid4().hex[:8]}"}
    )
    own = settings.kafka.model_copy(update={"topics": topics, "topic_partitions": 2})
    await ensure_topics(own)
    return own


async def _registered(db: asyncpg.Pool) -> str:
    token = uuid.uuid4().hex + uuid.uuid4().hex
    device = Registration(token, "ios", f"dev-{token[:8]}", "com.example.app")
    await store.register(db, f"u-{token[:8]}", device)
    return token


def _event(token: str, observed_at: datetime, reason: str = "Unregistered") -> bytes:
    return InvalidTokenEvent(
        token=token, platform="ios", reason=reason, observed_at=observed_at
    ).to_bytes()


async def _publish(kafka: KafkaSettings, values: list[bytes]) -> None:
    producer = make_producer(kafka)
    await start_client(producer, kafka)
    try:
        for value in values:
            await producer.send_and_wait(kafka.topics.invalid_tokens, value)
    finally:
        await producer.stop()


async def _consume_until_committed(
    kafka: KafkaSettings, db: asyncpg.Pool, metrics: Metrics, count: int, group: str
) -> None:
    """Run the consumer until it has committed ``count`` records, then stop it."""
    consumer = make_consumer(kafka, kafka.topics.invalid_tokens, group_id=group)
    await start_client(consumer, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(cleanup.consume(consumer, db, metrics, stop=stop))
    try:
        async with asyncio.timeout(30):
            while True:
                await asyncio.sleep(0.1)
                committed = 0
                for partition in consumer.assignment():
                    committed += await consumer.committed(partition) or 0
                if committed >= count:
                    break
    finally:
        stop.set()
        await task
        await consumer.stop()


async def _active(db: asyncpg.Pool, token: str) -> tuple[bool, str | None]:
    row = await db.fetchrow(
        "SELECT is_active, deactivation_reason FROM device_tokens WHERE token = $1", token
    )
    assert row is not None
    return row["is_active"], row["deactivation_reason"]


async def test_reported_tokens_are_deactivated_with_their_reason(
    kafka: KafkaSettings, db: asyncpg.Pool, group: str
) -> None:
    dead, bad, alive = await _registered(db), await _registered(db), await _registered(db)
    later = datetime.now(UTC) + timedelta(seconds=5)
    values = [
        _event(dead, later),
        _event(dead, later - timedelta(seconds=1)),  # the same token twice in a batch
        b"{not an event",  # skipped, not fatal
        _event(bad, later, reason="BadDeviceToken"),
    ]
    await _publish(kafka, values)
    metrics = Metrics()

    await _consume_until_committed(kafka, db, metrics, len(values), group)

    assert await _active(db, dead) == (False, "Unregistered")
    assert await _active(db, bad) == (False, "BadDeviceToken")
    assert await _active(db, alive) == (True, None)
    assert metrics.cleanup_skipped._value.get() == 1
    assert metrics.deactivations.labels("Unregistered")._value.get() == 1


async def test_a_token_registered_again_after_the_report_survives(
    kafka: KafkaSettings, db: asyncpg.Pool, group: str
) -> None:
    token = await _registered(db)
    failed_send = datetime.now(UTC) - timedelta(minutes=5)  # before the registration
    await _publish(kafka, [_event(token, failed_send)])

    await _consume_until_committed(kafka, db, Metrics(), 1, group)

    assert await _active(db, token) == (True, None)


async def test_offsets_are_committed_after_the_write(
    kafka: KafkaSettings, db: asyncpg.Pool, group: str
) -> None:
    tokens = [await _registered(db) for _ in range(3)]
    later = datetime.now(UTC) + timedelta(seconds=5)
    await _publish(kafka, [_event(t, later) for t in tokens])

    await _consume_until_committed(kafka, db, Metrics(), 3, group)

    # what the group would resume from: past every record (nothing read twice)
    reader = make_consumer(kafka, group_id=group)
    await start_client(reader, kafka)
    try:
        await assign_all(reader, kafka.topics.invalid_tokens)
        partitions = sorted(reader.assignment())
        committed = [await reader.committed(p) or 0 for p in partitions]
        ends = await reader.end_offsets(partitions)
    finally:
        await reader.stop()
    assert committed == [ends[p] for p in partitions]
    assert [await _active(db, t) for t in tokens] == [(False, "Unregistered")] * 3


async def test_hygiene_deactivates_stale_tokens_and_purges_old_rows(db: asyncpg.Pool) -> None:
    stale, fresh, long_dead = await _registered(db), await _registered(db), await _registered(db)
    await db.execute(
        "UPDATE device_tokens SET last_seen_at = now() - interval '91 days' WHERE token = $1",
        stale,
    )
    await db.execute(
        """UPDATE device_tokens SET is_active = false, deactivation_reason = 'logout',
                  deactivated_at = now() - interval '31 days' WHERE token = $1""",
        long_dead,
    )
    metrics = Metrics()

    done = await hygiene.run_once(db, HygieneSettings(batch_size=2), metrics)

    assert done.deactivated >= 1
    assert done.purged >= 1
    assert await _active(db, stale) == (False, "stale")
    assert await _active(db, fresh) == (True, None)
    assert await db.fetchval("SELECT count(*) FROM device_tokens WHERE token = $1", long_dead) == 0
    assert metrics.hygiene_runs._value.get() == 1
