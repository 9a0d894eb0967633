"""``pushfan cleanup``: deactivate the tokens the platforms reported dead.

Consumes the worker's invalid-token events (:class:`schemas.InvalidTokenEvent`) in
batches and deactivates each batch with set-based statements, recording the platform's
reason and the time. Race guard: a token registered again at or after the event's
``observed_at`` (the APNs 410 timestamp, else the send time) is left alone, since
``last_seen_at`` records the latest registration.

Contract:

- **Commit after write.** A batch's offsets are committed only after every statement of
  that batch committed; before a rebalance takes partitions away, the batch being
  written is finished and committed first. At-least-once, and idempotent: an inactive
  token is not touched again, so a batch read twice changes nothing.
- **Pipelined.** While one batch is written, the next is fetched and decoded, so the
  Python work overlaps the database's. One batch is written at a time (bounded memory).
- **Lanes.** A batch is written as ``lanes`` statements at once on separate connections,
  each over a disjoint, sorted range of tokens: the database spends more than one core
  on a burst, and two lanes never wait for each other's row locks.
- An event that does not parse is logged by reason (never the token), counted and
  skipped: it cannot become valid by waiting. A database error stops the consumer
  without committing the batch, so a restart re-reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import pydantic
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from pushfan.health import Health, serving, watching
from pushfan.kafka import make_consumer, start_client
from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from pushfan.settings import KafkaSettings, Settings
from schemas import InvalidTokenEvent
from schemas.common import format_validation_error

GROUP_ID = "pushfan-cleanup"

# Counts per reason instead of a row per token: the caller needs only the metrics.
DEACTIVATE_SQL = """
WITH done AS (
    UPDATE device_tokens AS d
       SET is_active = false, deactivated_at = now(), deactivation_reason = e.reason,
           updated_at = now()
      FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS e(token, observed_at, reason)
     WHERE d.token = e.token AND d.is_active AND d.last_seen_at < e.observed_at
    RETURNING e.reason
)
SELECT reason, count(*) AS n FROM done GROUP BY reason
"""

log = get_logger("pushfan.cleanup")


@dataclass(frozen=True, slots=True)
class Dead:
    token: str
    observed_at: datetime
    reason: str


def latest_per_token(events: Iterable[InvalidTokenEvent]) -> list[Dead]:
    """One entry per token, its latest report, sorted by token.

    An UPDATE touches a row once, and sorted input keeps the unique index's pages
    warm and every statement's row locks in one order.
    """
    latest: dict[str, InvalidTokenEvent] = {}
    for event in events:
        known = latest.get(event.token)
        if known is None or event.observed_at > known.observed_at:
            latest[event.token] = event
    return [Dead(token, e.observed_at, e.reason) for token, e in sorted(latest.items())]


def split(dead: Sequence[Dead], lanes: int) -> list[Sequence[Dead]]:
    """``dead`` (sorted, one entry per token) in at most ``lanes`` contiguous ranges."""
    size = -(-len(dead) // max(1, lanes))
    return [dead[i : i + size] for i in range(0, len(dead), size)] if dead else []


async def deactivate(
    db: asyncpg.Pool | asyncpg.Connection, dead: Sequence[Dead], metrics: Metrics | None = None
) -> int:
    """One statement: deactivate what the race guard allows; returns how many tokens."""
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
            metrics.deactivations.labels(row["reason"]).inc(row["n"])
    return sum(row["n"] for row in rows)


def start_lanes(
    pool: asyncpg.Pool, dead: Sequence[Dead], lanes: int, metrics: Metrics | None = None
) -> asyncio.Future[list[int | BaseException]]:
    """Start :func:`deactivate` over disjoint ranges at once, each its own transaction.

    Returns the lanes' counts or errors. A lane that fails does not stop the others:
    what committed stays committed, and re-running the whole batch is harmless.
    """
    tasks = [asyncio.create_task(deactivate(pool, part, metrics)) for part in split(dead, lanes)]
    return asyncio.gather(*tasks, return_exceptions=True)


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


@dataclass(frozen=True, slots=True)
class _Polled:
    """One poll's records, decoded."""

    offsets: dict[TopicPartition, int]  # the next offset to read, per partition
    records: int
    dead: list[Dead]

    @classmethod
    def decode(
        cls,
        polled: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        metrics: Metrics | None,
    ) -> _Polled | None:
        offsets = {tp: records[-1].offset + 1 for tp, records in polled.items() if records}
        if not offsets:
            return None
        events = [
            event
            for records in polled.values()
            for record in records
            if (event := decode(record.value, metrics)) is not None
        ]
        records = sum(len(batch) for batch in polled.values())
        return cls(offsets, records, latest_per_token(events))


@dataclass(frozen=True, slots=True)
class _Batch:
    polled: _Polled
    write: asyncio.Future[list[int | BaseException]]


class Cleanup(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """The cleanup consumer: read, deactivate, commit (see the module's contract).

    It is its own rebalance listener: partitions are never handed to another member
    while a write of theirs is outstanding and uncommitted.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        group_id: str = GROUP_ID,
        batch_size: int = 10_000,
        lanes: int = 4,
    ) -> None:
        self.kafka = kafka
        self.pool = pool
        self.metrics = metrics
        self.batch_size = batch_size
        self.lanes = lanes
        self.consumer = make_consumer(kafka, group_id=group_id)
        self.consumer.subscribe([kafka.topics.invalid_tokens], listener=self)
        self._pending: _Batch | None = None
        self._settle_lock = asyncio.Lock()

    async def start(self) -> None:
        await start_client(self.consumer, self.kafka)

    async def close(self) -> None:
        await self.consumer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Batches until ``stop`` is set; then the last batch is written and committed."""
        while not stop.is_set():
            records = await self.consumer.getmany(
                timeout_ms=50 if self._pending else 500, max_records=self.batch_size
            )
            # decoded while the previous batch is still being written
            polled = _Polled.decode(records, self.metrics)
            await self.settle()
            if polled is not None and not polled.offsets.keys() <= self.consumer.assignment():
                # a rebalance took partitions meanwhile: their records are the new owner's
                owned = self.consumer.assignment()
                polled = _Polled.decode({tp: r for tp, r in records.items() if tp in owned}, None)
            if polled is not None:
                write = start_lanes(self.pool, polled.dead, self.lanes, self.metrics)
                self._pending = _Batch(polled, write)
                # One loop turn lets the lanes send their statements before this task
                # goes on to fetch and decode the next batch: otherwise getmany() finds
                # records buffered, never yields, and nothing overlaps.
                await asyncio.sleep(0)
        await self.settle()

    async def settle(self) -> None:
        """Wait for the batch being written, then commit its offsets.

        Both the loop and the rebalance listener call this; the lock makes the second
        caller wait until the first has committed, so partitions are never handed over
        between a batch's write and its commit. A failed write raises here and leaves
        the batch uncommitted.
        """
        async with self._settle_lock:
            batch = self._pending
            if batch is None:
                return
            lanes = await batch.write
            for lane in lanes:
                if isinstance(lane, BaseException):
                    raise lane
            count = sum(lane for lane in lanes if isinstance(lane, int))
            self._pending = None
            if await self._commit(batch.polled.offsets):
                self.metrics.cleanup_committed.inc(batch.polled.records)
            log.info("cleanup batch", records=batch.polled.records, deactivated=count)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit ``offsets``; False if the partitions moved to another member first
        (their new owner reads the batch again, which changes nothing)."""
        if not offsets.keys() <= self.consumer.assignment():
            log.warning("cleanup batch written, its partitions moved on before the commit")
            return False
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("cleanup batch written but not committed", error=repr(exc))
            return False
        return True

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            await self.settle()
        except Exception as exc:  # run() raises it; here, hand over uncommitted
            log.warning("cleanup batch not committed before a rebalance", error=repr(exc))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None


async def run(
    settings: Settings, pool: asyncpg.Pool, metrics: Metrics, stop: asyncio.Event
) -> None:
    """The cleanup consumer of ``pushfan cleanup``, until ``stop``, with /metrics,
    /healthz and /readyz on ``PUSHFAN_HYGIENE__CLEANUP_METRICS_PORT`` (0: not served)."""
    health = Health("cleanup", metrics)
    port = settings.hygiene.cleanup_metrics_port
    with serving(metrics, port, "PUSHFAN_HYGIENE__CLEANUP_METRICS_PORT", health):
        cleanup = Cleanup(
            settings.kafka,
            pool,
            metrics,
            batch_size=settings.hygiene.cleanup_batch_size,
            lanes=settings.hygiene.cleanup_lanes,
        )
        await cleanup.start()
        try:
            async with watching(health, stop, pool=pool, consumer=cleanup.consumer, group=GROUP_ID):
                await cleanup.run(stop)
        finally:
            await cleanup.close()
