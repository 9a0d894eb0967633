"""Kafka clients built from :class:`~pushfan.settings.KafkaSettings`, and topic set-up.

Every pushfan process builds its producer and consumers here, so security options,
idempotence and client ids are decided in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from pushfan.errors import SetupError
from pushfan.settings import KafkaSettings


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by producers, consumers and the admin client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism is not None:
        opts["sasl_mechanism"] = settings.sasl_mechanism
        opts["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            opts["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context()
    return opts


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A producer that waits for every in-sync replica (acks=all) before a send succeeds."""
    opts: dict[str, Any] = {
        **client_options(settings),
        "acks": "all",
        "enable_idempotence": settings.enable_idempotence,
        "linger_ms": 5,
        **overrides,
    }
    return AIOKafkaProducer(**opts)


def make_consumer(
    settings: KafkaSettings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer with manual commits: pushfan commits only after results are recorded."""
    opts: dict[str, Any] = {
        **client_options(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        **overrides,
    }
    return AIOKafkaConsumer(*topics, **opts)


async def start_client(
    client: AIOKafkaProducer | AIOKafkaConsumer, settings: KafkaSettings
) -> None:
    """Start ``client``; a broker that cannot be reached or refuses us is a SetupError."""
    try:
        await client.start()
    except KafkaError as exc:
        await client.stop()
        hint = ""
        if isinstance(client, AIOKafkaProducer) and settings.enable_idempotence:
            hint = (
                " (if this broker does not support the idempotent producer, set "
                "PUSHFAN_KAFKA__ENABLE_IDEMPOTENCE=false)"
            )
        raise SetupError(
            f"Kafka at {settings.bootstrap_servers} refused the {type(client).__name__}: "
            f"{exc!r}{hint}"
        ) from exc


async def assign_all(consumer: AIOKafkaConsumer, topic: str) -> None:
    """Assign every partition of ``topic`` to a group-less ``consumer`` (already started).

    For readers that must see a whole topic from the start without joining a group
    (the demo, tests, the dead-letter inspector): no rebalance wait.
    """
    async with asyncio.timeout(10):
        while not (partitions := consumer.partitions_for_topic(topic)):
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.05)
    consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
    await consumer.seek_to_beginning()


# CreateTopics error codes that mean the topic is there.
_TOPIC_OK = {0, 36}  # NONE, TOPIC_ALREADY_EXISTS


async def ensure_topics(settings: KafkaSettings, *, also: Iterable[str] = ()) -> list[str]:
    """Create pushfan's topics that do not exist yet, and the topics ``also`` names;
    return the names created.

    Uses ``topic_partitions`` and ``topic_replication_factor``. A topic the broker
    refuses (authorisation, policy, too few brokers) is a SetupError naming it.
    ``also`` is for a stack that owns its broker (``pushfan up``, tests), to create the
    bridge's business topic; ``pushfan bridge`` itself never creates it, since it belongs
    to the system that produces it.
    """
    topics = settings.topics
    names = [topics.jobs, topics.shards, topics.retry, topics.dead_letter, topics.invalid_tokens]
    names += [n for n in also if n not in names]
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
    except KafkaError as exc:
        raise SetupError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}") from exc
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(n, settings.topic_partitions, settings.topic_replication_factor)
                    for n in missing
                ]
            )
            # Another process may create one between our list and our create (code 36).
            failed = [
                f"{name}: {message or code}"
                for name, code, *rest in response.topic_errors
                for message in [rest[0] if rest else None]
                if code not in _TOPIC_OK
            ]
            if failed:
                raise SetupError(f"Kafka refused to create topics: {'; '.join(failed)}")
        return missing
    finally:
        await admin.close()
