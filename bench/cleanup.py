"""Deactivations per second of the cleanup consumer, against its bare statement.

Seeds ``10n`` active tokens, publishes one invalid-token event for ``n`` of them, and runs
:class:`registry.cleanup.Cleanup` until those are inactive (and checks the others are
not). The clock starts at the first deactivation (a consumer group's join is the broker's
time, not ours). Baseline in the same run: the same statement over the same events in
batches of the same size and lanes, straight from asyncpg: no broker, no decoding.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from pushfan.kafka import ensure_topics, make_producer, start_client
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from registry import cleanup
from schemas import InvalidTokenEvent

# Rows in the table per reported token: a burst of dead tokens is a small share of a
# real table, and the share decides the plan (a hash join reads the whole table).
TABLE_RATIO = 10


async def _seed(conn: asyncpg.Connection, tokens: list[str]) -> None:
    await conn.execute("TRUNCATE device_tokens")
    alive = [f"alive-{i:08d}-{uuid.uuid4().hex}" for i in range(len(tokens) * (TABLE_RATIO - 1))]
    # registered an hour ago: every report below is newer, so the race guard lets it pass
    seen = datetime.now(UTC) - timedelta(hours=1)
    records = [
        (t, f"u-{i}", "android", f"d-{i}", "bench.app", seen) for i, t in enumerate(tokens + alive)
    ]
    await conn.copy_records_to_table(
        "device_tokens",
        records=records,
        columns=["token", "user_id", "platform", "device_id", "app_id", "last_seen_at"],
    )
    await conn.execute("VACUUM ANALYZE device_tokens")


async def _revive(conn: asyncpg.Connection) -> None:
    """Every token active again, for the next run over the same table."""
    await conn.execute(
        "UPDATE device_tokens SET is_active = true, deactivated_at = NULL,"
        " deactivation_reason = NULL WHERE NOT is_active"
    )
    await conn.execute("VACUUM ANALYZE device_tokens")


async def _inactive(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM device_tokens WHERE NOT is_active")
    return count


def _counted(metrics: Metrics) -> int:
    """Deactivations the consumer counted (read in-process: polling the table would
    load the database the consumer is measured on)."""
    value = metrics.registry.get_sample_value(
        "pushfan_tokens_deactivated_total", {"reason": "UNREGISTERED"}
    )
    return int(value or 0)


async def bench_cleanup(settings: Settings, n: int) -> None:
    url = settings.database.url.get_secret_value()
    batch, lanes = settings.hygiene.cleanup_batch_size, settings.hygiene.cleanup_lanes
    tokens = [f"bench-{i:08d}-{uuid.uuid4().hex}" for i in range(n)]
    now = datetime.now(UTC)
    dead = [cleanup.Dead(t, now, "UNREGISTERED") for t in tokens]
    conn = await asyncpg.connect(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=lanes)
    assert pool is not None
    try:
        await _seed(conn, tokens)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            part = sorted(dead[i : i + batch], key=lambda d: d.token)
            await cleanup.start_lanes(pool, part, lanes)
        bare = time.perf_counter() - t0
        assert await _inactive(conn) == n

        await _revive(conn)
        own = settings.kafka.topics.model_copy(
            update={"invalid_tokens": f"bench.invalid.{uuid.uuid4().hex[:8]}"}
        )
        kafka = settings.kafka.model_copy(update={"topics": own})
        await ensure_topics(kafka)
        producer = make_producer(kafka)
        await start_client(producer, kafka)
        try:
            events = [
                InvalidTokenEvent(
                    token=t, platform="android", reason="UNREGISTERED", observed_at=now
                )
                for t in tokens
            ]
            sent = [await producer.send(own.invalid_tokens, e.to_bytes()) for e in events]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()

        metrics = Metrics()
        consumer = cleanup.Cleanup(
            kafka,
            pool,
            metrics,
            group_id=f"bench-{uuid.uuid4().hex}",
            batch_size=batch,
            lanes=lanes,
        )
        await consumer.start()
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        try:
            started = 0.0
            while True:  # polled: the clock starts at the first deactivation
                done = _counted(metrics)
                if done and not started:
                    started = time.perf_counter()
                if done >= n:
                    break
                await asyncio.sleep(0.02)
            consumed = time.perf_counter() - started
        finally:
            stop.set()
            await task
            await consumer.close()
        assert await _inactive(conn) == n
        print(
            f"cleanup consumer      {n / consumed:>12,.0f}/s deactivations   bare statements "
            f"{n / bare:>12,.0f}/s   ratio {bare / consumed:.2f}   ({n:,} events,"
            f" {TABLE_RATIO * n:,} tokens, batches of {batch:,} in {lanes} lanes, all"
            f" {done:,} deactivated)"
        )
    finally:
        await pool.close()
        await conn.close()
