"""The worker's Kafka loop on the real broker: lanes, commits, long work, failing records."""

from __future__ import annotations

import asyncio
from collections import Counter

from aiokafka import TopicPartition

from pushfan.settings import Settings
from tests.worker_harness import eventually, own_topics, publish
from worker.consumer import Record, WorkerConsumer


async def _committed_is(consumer: WorkerConsumer, topic: str, offset: int) -> bool:
    """Whether the group's committed offset of ``topic``'s partition 0 is ``offset``."""
    committed: int | None = await consumer.consumer.committed(TopicPartition(topic, 0))
    return committed == offset


async def test_work_longer_than_max_poll_interval_is_not_taken_away(settings: Settings) -> None:
    s = await own_topics(settings, partitions=1)
    calls: Counter[bytes] = Counter()

    async def slow(record: Record, stop: asyncio.Event) -> bool:
        calls[record.value or b""] += 1
        if record.value == b"slow":
            await asyncio.sleep(6)  # twice max_poll_interval_ms
        return True

    async def dead_letter(record: Record, error: str, kind: str) -> None:
        raise AssertionError(error)

    consumer = WorkerConsumer(
        s.kafka,
        s.worker.group_id,
        {s.kafka.topics.jobs: slow},
        dead_letter,
        max_poll_interval_ms=3_000,
        session_timeout_ms=6_000,
        heartbeat_interval_ms=1_000,
    )
    await consumer.start()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await publish(s, b"slow", b"next")
        await eventually(lambda: calls[b"next"], within=30)
        await eventually(lambda: _committed_is(consumer, s.kafka.topics.jobs, 2), within=10)
    finally:
        stop.set()
        await task
        await consumer.close()
    # Handled once: the group never took the partition away to give it again.
    assert calls == {b"slow": 1, b"next": 1}


async def test_a_record_that_keeps_failing_is_dead_lettered_after_a_few_tries(
    settings: Settings,
) -> None:
    s = await own_topics(settings, partitions=1)
    calls: Counter[bytes] = Counter()
    letters: list[tuple[bytes, str, str]] = []

    async def flaky(record: Record, stop: asyncio.Event) -> bool:
        value = record.value or b""
        calls[value] += 1
        if value == b"bug":
            raise ValueError("a bug")
        if value == b"blip" and calls[value] < 3:
            raise ConnectionResetError("the database went away")
        return True

    async def dead_letter(record: Record, error: str, kind: str) -> None:
        letters.append((record.value or b"", error, kind))

    consumer = WorkerConsumer(s.kafka, s.worker.group_id, {s.kafka.topics.jobs: flaky}, dead_letter)
    await consumer.start()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await publish(s, b"blip", b"bug", b"fine")
        await eventually(lambda: calls[b"fine"], within=60)
        await eventually(lambda: _committed_is(consumer, s.kafka.topics.jobs, 3), within=10)
    finally:
        stop.set()
        await task
        await consumer.close()
    # The infrastructure error is waited out, never dead-lettered; the bug is, with its error.
    assert calls == {b"blip": 3, b"bug": 3, b"fine": 1}
    assert letters == [(b"bug", "processing failed: ValueError('a bug')", "processing")]
