"""``pushfan worker``: build the pipeline from the settings and run it until stopped.

Start-up problems (a broker or database that cannot be reached, missing platform
credentials) are a :class:`~pushfan.errors.SetupError` before anything is consumed.
Stopping (SIGTERM, SIGINT) stops consuming, lets in-flight pages finish and report
within ``drain_timeout_s``, commits, and leaves the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack

from pushfan.db import create_pool
from pushfan.health import Health, serving, watching
from pushfan.kafka import make_producer, start_client
from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from worker.consumer import WorkerConsumer
from worker.dispatch import Dispatcher
from worker.fanout import ALL_PLATFORMS, Clock, Fanout, utc_now
from worker.handlers import Handlers
from worker.pacing import PlatformGate
from worker.release import Releaser
from worker.report import Reporter
from worker.retry import RetryPolicy
from worker.senders.factory import SERVICE, build_senders, traffic_of

log = get_logger("pushfan.worker")

GC_GEN0_THRESHOLD = 10_000  # CPython's default is 700 allocations


def owner_id() -> str:
    """This process's name in the ledger's shard fencing: unique per start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def retry_policy(settings: Settings) -> RetryPolicy:
    r = settings.retry
    return RetryPolicy(
        max_attempts=r.max_attempts,
        max_total_s=r.max_total_s,
        base_delay_s=r.base_delay_s,
        max_delay_s=r.max_delay_s,
    )


def settle_gc() -> None:
    """Keep what start-up built (modules, SDKs, clients: most of the heap) out of the
    cyclic collector's full passes, and let it run less often. Sending allocates a few
    objects per token; with the defaults the collector took ~30% of the worker's CPU
    (measured: 4.3 s of 14.6 in one broadcast of 200,000 tokens, 31 full passes)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _paused(gate: PlatformGate) -> Callable[[], float]:
    """The gate's state as the gauge reads it at scrape time: 1 while closed."""
    return lambda: 1.0 if gate.remaining > 0 else 0.0


async def run(
    settings: Settings,
    stop: asyncio.Event,
    metrics: Metrics | None = None,
    *,
    clock: Clock = utc_now,
) -> None:
    """The worker, until ``stop`` is set. ``clock``: now, for the delivery policy (quiet
    hours, the frequency cap) and job expiry; tests pass one they move."""
    metrics = metrics or Metrics()
    w = settings.worker
    async with AsyncExitStack() as stack:
        health = Health("worker", metrics)
        port = w.metrics_port
        stack.enter_context(serving(metrics, port, "PUSHFAN_WORKER__METRICS_PORT", health))
        pool = await create_pool(settings.database)
        stack.push_async_callback(pool.close)
        senders = build_senders(settings, ALL_PLATFORMS)
        for platform, sender in senders.items():
            if (traffic := traffic_of(sender)) is not None:
                metrics.traffic.watch(SERVICE[platform], traffic)
        dispatcher = Dispatcher(
            senders,
            w,
            retry_policy(settings),
            apns_topic=settings.apns.topic or "",
            in_flight={"fcm": settings.fcm.concurrency, "apns": settings.apns.concurrency},
        )
        stack.push_async_callback(dispatcher.close)
        for service, gate in dispatcher.gates.items():
            metrics.child(metrics.platform_paused, service).set_function(_paused(gate))
        producer = make_producer(settings.kafka)
        await start_client(producer, settings.kafka)
        stack.push_async_callback(producer.stop)
        reporter = Reporter(producer, settings.kafka.topics, metrics)
        fanout = Fanout(pool, dispatcher, reporter, metrics, w, owner=owner_id(), clock=clock)
        handlers = Handlers(settings, fanout, dispatcher, reporter, producer, metrics)
        consumer = WorkerConsumer(
            settings.kafka,
            w.group_id,
            {
                settings.kafka.topics.jobs: handlers.job,
                settings.kafka.topics.shards: handlers.shard,
                settings.kafka.topics.retry: handlers.retry,
            },
            handlers.dead_letter,
            drain_timeout_s=w.drain_timeout_s,
            metrics=metrics,
        )
        await consumer.start()
        stack.push_async_callback(consumer.close)
        settle_gc()
        log.info("worker consuming", owner=fanout.owner, group=w.group_id)
        releaser = asyncio.create_task(Releaser(fanout, reporter, metrics).run(stop))
        try:
            async with watching(
                health, stop, pool=pool, consumer=consumer.consumer, group=w.group_id
            ):
                await consumer.run(stop)  # on stop, the watcher marks the worker draining
        finally:
            stop.set()
            # A round in flight finishes within the drain bound; cancelled past it, its
            # transaction rolls back and its deferrals wait for the next round.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(releaser, w.drain_timeout_s)
