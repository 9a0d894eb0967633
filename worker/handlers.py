"""What the worker does with each record of its three topics.

Every handler returns True when the record is finished and its offset may be committed,
False when it stopped part-way (SIGTERM, a rebalance): the record is then left for its
next owner, who resumes it from the ledger.

- **jobs**: decode (else dead-letter), skip a job the ledger has finished, drop an
  expired one, then send an audience of one page at once, or split a bigger one into
  shards on the shards topic for the whole group.
- **shards**: claim the shard, send its pages from the ledger's cursor, complete it
  (the last shard completes the job).
- **retry**: wait until the batch is due, send it, record it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from datetime import UTC, datetime
from typing import TypeAlias

import pydantic
from aiokafka import AIOKafkaProducer, ConsumerRecord

from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from schemas import DeadLetter, NotificationJob, decode_job, format_validation_error
from schemas.work import RetryBatch, ShardTask
from worker import ledger
from worker.audience import Shard, listed_ids, shard_job, split
from worker.dispatch import Dispatcher
from worker.fanout import End, Fanout
from worker.report import Reporter

log = get_logger("pushfan.worker")

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


class Handlers:
    def __init__(
        self,
        settings: Settings,
        fanout: Fanout,
        dispatcher: Dispatcher,
        reporter: Reporter,
        producer: AIOKafkaProducer,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.fanout = fanout
        self.pool = fanout.pool
        self.dispatcher = dispatcher
        self.reporter = reporter
        self.producer = producer
        self.metrics = metrics
        self.topics = settings.kafka.topics

    # -- dead letters --------------------------------------------------------------------

    async def dead_letter(self, record: Record, error: str, kind: str) -> None:
        letter = DeadLetter.of(record, error, kind, datetime.now(UTC))  # type: ignore[arg-type]
        await self.producer.send_and_wait(
            self.topics.dead_letter, letter.to_bytes(), key=record.key
        )
        self.metrics.child(self.metrics.dead_letters, kind).inc()
        self.metrics.child(self.metrics.jobs, "dead_lettered").inc()
        log.warning(
            "dead-lettered a record",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=error,
        )

    # -- jobs ----------------------------------------------------------------------------

    async def job(self, record: Record, stop: asyncio.Event) -> bool:
        try:
            job = decode_job(record.value or b"")
        except pydantic.ValidationError as exc:
            kind = "decode" if _is_json_error(exc) else "validation"
            await self.dead_letter(record, format_validation_error(exc), kind)
            return True
        row = await ledger.begin(self.pool, job)
        if row.state in ledger.FINAL_STATES:
            self._count("duplicate")
            return True
        if job.is_expired(self.fanout.clock()):
            await ledger.finish(self.pool, job.job_id, "expired")
            self._count("expired")
            return True
        if row.shards_total:  # split before a crash: publish what is not done again
            await self._publish(job, await ledger.open_shards(self.pool, job.job_id))
            return True
        page_size = self.settings.worker.page_size
        listed = listed_ids(job)
        if listed is None or len(listed) > page_size:
            shards = await split(self.pool, job, page_size * self.settings.worker.shard_pages)
            if len(shards) > 1 or shards[0].users > page_size:
                await ledger.create_shards(self.pool, job.job_id, shards)
                await self._publish(job, shards)
                self.metrics.audience_users.inc(sum(s.users for s in shards))
                self._count("split")
                log.info("job split", job_id=job.job_id, shards=len(shards))
                return True
        end = await self.fanout.run_range(job, shard_no=None, after=None, until=None, stop=stop)
        if end is End.STOPPED:
            return False
        state = "expired" if end is End.EXPIRED else "completed"
        await ledger.finish(self.pool, job.job_id, state)
        self._count("dry_run" if job.dry_run and state == "completed" else state)
        return True

    async def _publish(self, job: NotificationJob, shards: list[Shard]) -> None:
        """One message per shard, dealt round the shards topic's partitions in turn: hashed
        keys can leave one partition (and so one worker) with several shards of a job
        while another has none. A shard published again lands where it did before."""
        topic = self.topics.shards
        partitions = sorted(await self.producer.partitions_for(topic))
        first = zlib.crc32(job.job_id.encode())  # jobs start on different partitions
        futures = []
        for shard in shards:
            task = ShardTask(
                job=shard_job(job, shard),
                shard_no=shard.shard_no,
                after=shard.after,
                until=shard.until,
            )
            key = f"{job.job_id}:{shard.shard_no}".encode()
            partition = partitions[(first + shard.shard_no) % len(partitions)]
            futures.append(
                await self.producer.send(topic, task.to_bytes(), key=key, partition=partition)
            )
        await asyncio.gather(*futures)

    def _count(self, outcome: str) -> None:
        self.metrics.child(self.metrics.jobs, outcome).inc()

    # -- shards --------------------------------------------------------------------------

    async def shard(self, record: Record, stop: asyncio.Event) -> bool:
        try:
            task = ShardTask.from_bytes(record.value or b"")
        except pydantic.ValidationError as exc:
            await self.dead_letter(record, format_validation_error(exc), "validation")
            return True
        job = task.job
        claim = await ledger.claim(self.pool, job.job_id, task.shard_no, self.fanout.owner)
        if claim is None or claim.completed:
            return True
        self.metrics.shards_running.inc()
        try:
            end = await self.fanout.run_range(
                job,
                shard_no=task.shard_no,
                after=claim.cursor or task.after,
                until=task.until,
                stop=stop,
            )
        finally:
            self.metrics.shards_running.dec()
        if end is End.STOPPED:
            return False
        if end is End.FENCED:
            log.warning(
                "shard taken over by another worker", job_id=job.job_id, shard=task.shard_no
            )
            return True
        if end is End.EXPIRED:
            await ledger.finish(self.pool, job.job_id, "expired")
        state = await ledger.complete_shard(self.pool, job.job_id, task.shard_no, self.fanout.owner)
        if state == "completed":
            self._count("dry_run" if job.dry_run else "completed")
            log.info("job completed", job_id=job.job_id)
        elif state == "expired" and end is End.EXPIRED:
            self._count("expired")
        return True

    # -- retry ---------------------------------------------------------------------------

    async def retry(self, record: Record, stop: asyncio.Event) -> bool:
        try:
            batch = RetryBatch.from_bytes(record.value or b"")
        except pydantic.ValidationError as exc:
            await self.dead_letter(record, format_validation_error(exc), "validation")
            return True
        wait = (batch.not_before - datetime.now(UTC)).total_seconds()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return False
        job = batch.job
        if await ledger.retry_applied(self.pool, job.job_id, batch.batch_id):
            return True
        if job.is_expired(self.fanout.clock()):
            counts = ledger.Counts(expired=len(batch.tokens))
            await ledger.apply_retry(
                self.pool, job.job_id, batch.batch_id, len(batch.tokens), counts, []
            )
            return True
        sent = await self.dispatcher.send(
            job,
            {batch.platform: [(t.id, t.token) for t in batch.tokens]},
            shard_no=batch.shard_no,
            attempt=batch.attempt,
        )
        await self.reporter.publish(sent)
        await ledger.apply_retry(
            self.pool,
            job.job_id,
            batch.batch_id,
            len(batch.tokens),
            sent.counts,
            sent.delivered_ids,
        )
        self.reporter.observe(sent)
        return True


def _is_json_error(exc: pydantic.ValidationError) -> bool:
    return any(e["type"] in ("json_invalid", "json_type") for e in exc.errors())
