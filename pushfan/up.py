"""``pushfan up`` (``make run``): the whole system on embedded defaults, and a demo.

Today it starts the infrastructure (a Kafka-protocol broker and PostgreSQL, see
:mod:`pushfan.stack`) and the FCM and APNs emulators, applies the migrations, creates
the topics, and shows a notification job travelling through the real broker. The
services (worker, registry, cleanup) join this as their issues land.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta

from pushfan.db import migrate
from pushfan.emulators.runner import SERVING, describe, start_emulators
from pushfan.kafka import assign_all, ensure_topics, make_consumer, make_producer, start_client
from pushfan.settings import Settings
from pushfan.stack import Stack, redact_url, start_stack
from schemas import NotificationJob, decode_job


def run_up(settings: Settings, *, exit_after_demo: bool) -> int:
    """Start the stack, run the demo, serve until SIGINT/SIGTERM (or not), stop cleanly."""
    print("pushfan up: starting the embedded stack ...", flush=True)
    # The client libraries narrate connections and rebalances at INFO; keep the demo readable.
    if settings.logging.level == "INFO":
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # Started from the main thread: the broker process is tied to the thread that spawned it.
    stack = start_stack(settings, purpose="pushfan")
    try:
        return asyncio.run(_up(stack.apply(settings), stack, exit_after_demo))
    finally:
        stack.close()
        print("pushfan up: stopped", flush=True)


async def _up(settings: Settings, stack: Stack, exit_after_demo: bool) -> int:
    applied = await migrate(settings.database.url.get_secret_value())
    created = await ensure_topics(settings.kafka)
    print(f"  migrations applied: {', '.join(f'{m.version:04d}_{m.name}' for m in applied) or '-'}")
    print(f"  topics created:     {', '.join(created) or '-'}")
    emulators = await start_emulators()
    try:
        if not await _demo_round_trip(settings):
            return 1
        _print_where(settings, stack)
        print(describe(emulators), flush=True)
        if exit_after_demo:
            return 0
        print(f"\n{SERVING}", flush=True)
        await wait_for_stop_signal()
        return 0
    finally:
        await emulators.stop()


async def _demo_round_trip(settings: Settings) -> bool:
    """Publish an "order shipped" job and read it back from the broker, as the worker will.

    Returns whether the job read back equals the one published.
    """
    now = datetime.now(UTC)
    job = NotificationJob.model_validate(
        {
            "job_id": f"demo-{uuid.uuid4().hex[:12]}",
            "type": "order_shipped",
            "priority": "normal",
            "audience": {"kind": "user", "user_id": "42"},
            "payload": {
                "title": "Your order has shipped",
                "body": "Order 123 is on its way.",
                "data": {"order_id": "123"},
            },
            "created_at": now,
            "expires_at": now + timedelta(hours=1),
        }
    )
    topic = settings.kafka.topics.jobs
    producer = make_producer(settings.kafka)
    consumer = make_consumer(settings.kafka, group_id=None)
    await start_client(producer, settings.kafka)
    try:
        await start_client(consumer, settings.kafka)
    except BaseException:
        await producer.stop()
        raise
    try:
        started = time.perf_counter()
        meta = await producer.send_and_wait(topic, job.to_bytes(), key=b"42")
        await assign_all(consumer, topic)
        async with asyncio.timeout(30):
            async for record in consumer:
                if record.value is None:
                    continue
                received = decode_job(record.value)
                if received.job_id == job.job_id:
                    break
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        await consumer.stop()
        await producer.stop()
    same = received == job
    print(
        f"  demo: job {job.job_id} published to {topic}[{meta.partition}]@{meta.offset} "
        f"and read back ({'identical' if same else 'DIFFERENT: the wire format is broken'}) "
        f"in {elapsed_ms:.0f} ms"
    )
    return same


def _print_where(settings: Settings, stack: Stack) -> None:
    db = settings.database.url.get_secret_value()
    rows = [
        (f"Kafka broker ({stack.broker.kind})", stack.broker.bootstrap_servers),
        (f"PostgreSQL ({stack.database.kind})", redact_url(db)),
        ("jobs topic", settings.kafka.topics.jobs),
    ]
    width = max(len(name) for name, _ in rows) + 1
    print(
        "\nEverything is here:\n"
        + "".join(f"  {name + ':':<{width}} {value}\n" for name, value in rows)
        + "Point other pushfan commands at it with:\n"
        f"  export KAFKA_BOOTSTRAP_SERVERS={stack.broker.bootstrap_servers}\n"
        f"  export DATABASE_URL='{redact_url(db)}'\n"
        "Platform emulators (scriptable; see pushfan/emulators/script.py):",
        flush=True,
    )


async def wait_for_stop_signal() -> None:
    """Return once SIGINT or SIGTERM arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
