"""Wire contracts through the real broker: what a producer writes is what a consumer reads."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from aiokafka import ConsumerRecord

from pushfan.kafka import assign_all, ensure_topics, make_consumer, make_producer
from pushfan.settings import KafkaSettings, Settings
from schemas import DeadLetter, NotificationJob, decode_job


async def _read_one(settings: KafkaSettings, topic: str) -> ConsumerRecord[bytes, bytes]:
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        await assign_all(consumer, topic)
        async with asyncio.timeout(30):
            record: ConsumerRecord[bytes, bytes] = await consumer.getone()
            return record
    finally:
        await consumer.stop()


def _job() -> NotificationJob:
    now = datetime.now(UTC)
    return NotificationJob.model_validate(
        {
            "job_id": f"job-{uuid.uuid4().hex}",
            "type": "order_shipped",
            "priority": "urgent",
            "audience": {"kind": "users", "user_ids": ["7", "8", "u-9"]},
            "platforms": ["ios", "android"],
            "payload": {
                "title": "Shipped ✈",
                "body": "Order 123 left the warehouse.",
                "data": {"order_id": "123", "carrier": "DHL"},
                "apns": {"collapse_id": "order-123", "badge": 1, "sound": "default"},
                "android": {"channel_id": "orders", "ttl": 3600, "priority": "high"},
            },
            "created_at": now,
            "expires_at": now + timedelta(hours=2),
            "campaign_id": "c-1",
        }
    )


async def test_topics_are_created_once(settings: Settings) -> None:
    kafka = settings.kafka.model_copy(
        update={
            "topic_partitions": 3,
            "topics": settings.kafka.topics.model_copy(
                update={
                    name: f"{settings.kafka.topics.jobs}.{name}.{uuid.uuid4().hex[:6]}"
                    for name in type(settings.kafka.topics).model_fields
                }
            ),
        }
    )
    first = await ensure_topics(kafka)
    second = await ensure_topics(kafka)

    assert sorted(first) == sorted(kafka.topics.model_dump().values())
    assert second == []


async def test_a_job_round_trips_through_the_broker(settings: Settings) -> None:
    topic = f"{settings.kafka.topics.jobs}.roundtrip.{uuid.uuid4().hex[:6]}"
    job = _job()
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(topic, job.to_bytes(), key=job.job_id.encode())
    finally:
        await producer.stop()

    record = await _read_one(settings.kafka, topic)

    assert record.key == job.job_id.encode()
    assert decode_job(record.value) == job


async def test_a_dead_letter_keeps_the_original_bytes(settings: Settings) -> None:
    topic = f"{settings.kafka.topics.dead_letter}.{uuid.uuid4().hex[:6]}"
    original = b'\xff\xfe{"job_id": broken'
    letter = DeadLetter(
        original=original,
        key=b"k\x00",
        topic=settings.kafka.topics.jobs,
        partition=2,
        offset=41,
        error="not valid UTF-8 JSON",
        error_kind="decode",
        failed_at=datetime.now(UTC),
    )
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(topic, letter.to_bytes())
    finally:
        await producer.stop()

    back = DeadLetter.from_bytes((await _read_one(settings.kafka, topic)).value)

    assert back == letter
    assert back.original == original
