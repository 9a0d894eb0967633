"""The cleanup consumer through the real broker, and token hygiene, on the real database."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiokafka import TopicPartition

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


async def _offsets(
    kafka: KafkaSettings, group: str
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """What ``group`` would resume from and where the topic ends, per partition, read by
    one reader that does not join the group."""
    reader = make_consumer(kafka, group_id=group)
    await start_client(reader, kafka)
    try:
        await assign_all(reader, kafka.topics.invalid_tokens)
        partitions = sorted(reader.assignment())
        committed = {p: await reader.committed(p) or 0 for p in partitions}
        ends: dict[TopicPartition, int] = await reader.end_offsets(partitions)
        return committed, ends
    finally:
        await reader.stop()


async def _caught_up(kafka: KafkaSettings, group: str) -> bool:
    committed, ends = await _offsets(kafka, group)
    return committed == ends


async def _consume_until_committed(
    kafka: KafkaSettings,
    db: asyncpg.Pool,
    metrics: Metrics,
    count: int,
    group: str,
    **options: int,
) -> None:
    """Run the consumer until it has committed ``count`` records, then stop it."""
    consumer = cleanup.Cleanup(kafka, db, metrics, group_id=group, **options)
    await consumer.start()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        async with asyncio.timeout(30):
            while True:
                await asyncio.sleep(0.1)
                committed = 0
                for partition in consumer.consumer.assignment():
                    committed += await consumer.consumer.committed(partition) or 0
                if committed >= count:
                    break
    finally:
        stop.set()
        await task
        await consumer.close()


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
    assert await _caught_up(kafka, group)
    assert [await _active(db, t) for t in tokens] == [(False, "Unregistered")] * 3


async def test_a_batch_is_written_in_lanes_over_several_polls(
    kafka: KafkaSettings, db: asyncpg.Pool, group: str
) -> None:
    tokens = [await _registered(db) for _ in range(40)]
    later = datetime.now(UTC) + timedelta(seconds=5)
    await _publish(kafka, [_event(t, later, reason=f"R{i % 3}") for i, t in enumerate(tokens)])
    metrics = Metrics()

    # 7 records a poll, written as up to 3 statements at once: 6 polls, pipelined
    await _consume_until_committed(kafka, db, metrics, 40, group, batch_size=7, lanes=3)

    assert [await _active(db, t) for t in tokens] == [
        (False, f"R{i % 3}") for i in range(len(tokens))
    ]
    counted = {r: metrics.deactivations.labels(r)._value.get() for r in ("R0", "R1", "R2")}
    assert counted == {"R0": 14, "R1": 13, "R2": 13}
    assert await _caught_up(kafka, group)


async def test_a_failed_write_commits_nothing(
    kafka: KafkaSettings, db: asyncpg.Pool, group: str
) -> None:
    token = await _registered(db)
    await _publish(kafka, [_event(token, datetime.now(UTC) + timedelta(seconds=5))])
    broken = await asyncpg.create_pool(
        db._connect_args[0],  # type: ignore[attr-defined]
        min_size=0,
        server_settings={"default_transaction_read_only": "on"},
    )
    assert broken is not None
    consumer = cleanup.Cleanup(kafka, broken, Metrics(), group_id=group)
    await consumer.start()
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            async with asyncio.timeout(30):
                await consumer.run(asyncio.Event())
    finally:
        await consumer.close()
        await broken.close()

    assert await _active(db, token) == (True, None)
    committed, _ = await _offsets(kafka, group)
    assert set(committed.values()) == {0}


class _Revoking(logging.Handler):
    """Set when a member of the group starts giving up partitions it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Revoking previously assigned") and "TopicPartition(" in message:
            self.seen.set()


async def test_a_rebalance_waits_for_the_batch_being_written(
    kafka: KafkaSettings, db: asyncpg.Pool, group: str
) -> None:
    tokens = [await _registered(db) for _ in range(60)]
    later = datetime.now(UTC) + timedelta(seconds=5)
    producer = make_producer(kafka)
    await start_client(producer, kafka)
    try:  # both partitions: after the rebalance, one of them is the other member's
        for i, token in enumerate(tokens):
            await producer.send_and_wait(
                kafka.topics.invalid_tokens, _event(token, later), partition=i % 2
            )
    finally:
        await producer.stop()
    metrics = Metrics(), Metrics()
    members = [cleanup.Cleanup(kafka, db, m, group_id=group) for m in metrics]
    stops = asyncio.Event(), asyncio.Event()
    revoking = _Revoking()
    logging.getLogger("aiokafka.consumer.group_coordinator").addHandler(revoking)
    # a registration of one of the tokens holds its row: the batch's write waits for it
    holder = await db.acquire()
    held = holder.transaction()
    await held.start()
    await holder.execute("SELECT 1 FROM device_tokens WHERE token = $1 FOR UPDATE", tokens[0])
    running: list[asyncio.Task[None]] = []
    released = False
    try:
        await members[0].start()
        running.append(asyncio.create_task(members[0].run(stops[0])))
        async with asyncio.timeout(60):
            while True:  # until the first member's write waits on the row lock
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            # a second member joins (its start returns once the group has settled), so
            # the first must hand partitions over while its write waits on the lock
            joining = asyncio.create_task(members[1].start())
            await revoking.seen.wait()
            # the rebalance cannot finish while the first member's write is outstanding:
            # after twice what a join takes here (about 5 s), the group still waits for it
            await asyncio.wait([joining], timeout=10)
            assert not joining.done()
            await held.rollback()  # the write goes through; only then may the rebalance end
            released = True
            await joining
            running.append(asyncio.create_task(members[1].run(stops[1])))
            while True:
                if await _caught_up(kafka, group):
                    break
                await asyncio.sleep(0.1)
    finally:
        logging.getLogger("aiokafka.consumer.group_coordinator").removeHandler(revoking)
        if not released:
            await held.rollback()
        await db.release(holder)
        for stop in stops:
            stop.set()
        await asyncio.gather(*running)
        for member in members:
            await member.close()

    assert [await _active(db, t) for t in tokens] == [(False, "Unregistered")] * 60
    # the first member committed its batch before handing the partition over: the second
    # member never read it again
    assert [m.cleanup_committed._value.get() for m in metrics] == [60, 0]


def test_split_gives_disjoint_sorted_ranges() -> None:
    now = datetime.now(UTC)
    dead = cleanup.latest_per_token(
        InvalidTokenEvent(token=t, platform="web", reason="x", observed_at=now)
        for t in ["c", "a", "b", "a", "e", "d", "f"]
    )
    assert [d.token for d in dead] == ["a", "b", "c", "d", "e", "f"]
    assert [[d.token for d in part] for part in cleanup.split(dead, 4)] == [
        ["a", "b"],
        ["c", "d"],
        ["e", "f"],
    ]
    assert cleanup.split(dead, 1) == [dead]
    assert cleanup.split([], 3) == []


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
    # A purged token's delivery day goes with it; a kept token's stays.
    await db.execute(
        "INSERT INTO token_deliveries (token_id, delivered_on)"
        " SELECT id, current_date FROM device_tokens WHERE token = ANY($1::text[])",
        [fresh, long_dead],
    )
    purged_id = await db.fetchval("SELECT id FROM device_tokens WHERE token = $1", long_dead)
    metrics = Metrics()

    done = await hygiene.run_once(db, HygieneSettings(batch_size=2), metrics)

    assert done.deactivated >= 1
    assert done.purged >= 1
    assert await _active(db, stale) == (False, "stale")
    assert await _active(db, fresh) == (True, None)
    assert await db.fetchval("SELECT count(*) FROM device_tokens WHERE token = $1", long_dead) == 0
    fresh_id = await db.fetchval("SELECT id FROM device_tokens WHERE token = $1", fresh)
    marks = await db.fetch(
        "SELECT token_id FROM token_deliveries WHERE token_id = ANY($1::bigint[])",
        [purged_id, fresh_id],
    )
    assert {r[0] for r in marks} == {fresh_id}
    assert metrics.hygiene_runs._value.get() == 1
