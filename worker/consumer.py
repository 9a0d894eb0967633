"""The worker's Kafka loop: partitions concurrently, in order within each, commit last.

Each assigned partition with work gets a *lane*: a task that handles its records one
after another and commits ``offset + 1`` after each record's results are recorded. A
partition is paused while its lane has work, and the loop keeps calling ``getmany`` for
the others, so the consumer never misses ``max_poll_interval_ms`` however long a shard
takes. Before partitions are taken away (a rebalance, SIGTERM), their lanes are told to
stop between pages and given ``drain_timeout_s`` to report; what they did not finish
stays uncommitted and is resumed from the ledger by the next owner.

A handler that raises is retried in place with growing pauses (the partition waits,
nothing is skipped): a database or broker that is down comes back. A record that keeps
failing with anything else is a bug's victim; after a few attempts it goes to the
dead-letter topic with the error, so the partition can move on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import asyncpg
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from pushfan.kafka import make_consumer, start_client
from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from pushfan.settings import KafkaSettings

log = get_logger("pushfan.worker")

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
Handler = Callable[[Record, asyncio.Event], Awaitable[bool]]
DeadLetterFn = Callable[[Record, str, str], Awaitable[None]]

# Errors of the infrastructure: waited out, never a reason to dead-letter a record.
INFRA_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.QueryCanceledError,
    KafkaError,
)
BUG_ATTEMPTS = 3
MAX_PAUSE_S = 30.0


@dataclass(eq=False)
class Lane:
    tp: TopicPartition
    records: deque[Record] = field(default_factory=deque)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


class WorkerConsumer(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(
        self,
        kafka: KafkaSettings,
        group_id: str,
        handlers: Mapping[str, Handler],
        dead_letter: DeadLetterFn,
        *,
        drain_timeout_s: float = 20.0,
        metrics: Metrics | None = None,
        **overrides: object,
    ) -> None:
        self.kafka = kafka
        self.metrics = metrics
        self.handlers = dict(handlers)
        self.dead_letter = dead_letter
        self.drain_timeout_s = drain_timeout_s
        self.consumer = make_consumer(kafka, group_id=group_id, **overrides)
        self.consumer.subscribe(list(self.handlers), listener=self)
        self.lanes: dict[TopicPartition, Lane] = {}

    async def start(self) -> None:
        await start_client(self.consumer, self.kafka)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop``; then drain every lane and return (offsets committed
        for every finished record)."""
        try:
            while not stop.is_set():
                polled = await self.consumer.getmany(timeout_ms=200, max_records=500)
                for tp, records in polled.items():
                    if records:
                        self._feed(tp, records)
        finally:
            await self._drain(list(self.lanes.values()))
            self.lanes.clear()

    async def close(self) -> None:
        await self.consumer.stop()

    def _feed(self, tp: TopicPartition, records: list[Record]) -> None:
        lane = self.lanes.get(tp)
        if lane is None:
            lane = self.lanes[tp] = Lane(tp)
        lane.records.extend(records)
        self.consumer.pause(tp)
        if not lane.busy:
            lane.task = asyncio.create_task(
                self._work(lane), name=f"lane {tp.topic}[{tp.partition}]"
            )

    async def _work(self, lane: Lane) -> None:
        handler = self.handlers[lane.tp.topic]
        while lane.records and not lane.stop.is_set():
            record = lane.records[0]
            if not await self._handle(handler, record, lane):
                return  # stopped part-way: left uncommitted for the next owner
            await self._commit(lane.tp, record.offset + 1)
            lane.records.popleft()
        if not lane.stop.is_set() and lane.tp in self.consumer.assignment():
            self.consumer.resume(lane.tp)

    async def _handle(self, handler: Handler, record: Record, lane: Lane) -> bool:
        failures = 0
        while True:
            try:
                return await handler(record, lane.stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                infra = isinstance(exc, INFRA_ERRORS)
                log.error(
                    "record failed",
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    error=repr(exc)[:500],
                    attempt=failures,
                    waiting=infra,
                )
                if not infra and failures >= BUG_ATTEMPTS:
                    await self.dead_letter(
                        record, f"processing failed: {exc!r}"[:1000], "processing"
                    )
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.stop.wait(), min(MAX_PAUSE_S, 0.5 * 2**failures))
            if lane.stop.is_set():
                return False

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self.consumer.assignment():
            return
        started = time.perf_counter()
        try:
            await self.consumer.commit({tp: offset})
            if self.metrics is not None:
                seconds = time.perf_counter() - started
                self.metrics.child(self.metrics.stage_seconds, "commit").observe(seconds)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # Partitions moved on: the new owner finds the ledger says this record is done.
            log.warning("commit refused", topic=tp.topic, partition=tp.partition, error=repr(exc))

    async def _drain(self, lanes: list[Lane]) -> None:
        """Stop ``lanes`` between pages and wait for them, at most ``drain_timeout_s``."""
        for lane in lanes:
            lane.stop.set()
        tasks = [lane.task for lane in lanes if lane.task is not None and not lane.task.done()]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=self.drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("lanes cancelled after the drain timeout", lanes=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("lane failed", error=repr(task.exception()))

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        lanes = [self.lanes.pop(tp) for tp in list(self.lanes) if tp in revoked]
        await self._drain(lanes)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None
