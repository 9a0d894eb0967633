"""Publishing notification jobs: :class:`JobProducer` (asyncio) and :func:`build_job`.

A job is validated against :mod:`schemas` before anything is sent, so an invalid job is
an :class:`InvalidJob` here rather than a dead letter later; a batch is validated whole
first, so a bad job in it sends none. Every send waits for the broker's acknowledgement
from all in-sync replicas (``acks=all``; idempotent where the broker supports it, see
``PUSHFAN_KAFKA__ENABLE_IDEMPOTENCE``) and returns the job id, the idempotency key: a
job published twice with one id is delivered once.

Keys: a job for one user is keyed by that user, so one user's notifications stay in one
partition, in order; any other job by its job id, so broadcasts spread over the
partitions (and so over the workers).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import pydantic
from aiokafka import AIOKafkaProducer

from pushfan.kafka import make_producer, start_client
from pushfan.settings import KafkaSettings
from schemas import NotificationJob, format_validation_error


class InvalidJob(ValueError):
    """A job that breaks the schema; the message says where and why."""


def validate(job: NotificationJob | Mapping[str, Any]) -> NotificationJob:
    """``job`` as a model; :class:`InvalidJob` if it is not a valid job."""
    if isinstance(job, NotificationJob):
        return job
    try:
        return NotificationJob.model_validate(dict(job))
    except pydantic.ValidationError as exc:
        raise InvalidJob(format_validation_error(exc)) from exc


def job_key(job: NotificationJob) -> bytes:
    """The record key: ``user:<id>`` for a one-user job, else the job id."""
    audience = job.audience
    if audience.kind == "user":
        return f"user:{audience.user_id}".encode()
    return job.job_id.encode()


def build_job(
    audience: Mapping[str, Any],
    *,
    type: str,
    title: str | None = None,
    body: str | None = None,
    data: Mapping[str, str] | None = None,
    job_id: str | None = None,
    ttl: timedelta | None = timedelta(hours=24),
    now: datetime | None = None,
    **fields: Any,
) -> NotificationJob:
    """A job with the producer's stamps: ``created_at`` now, ``expires_at`` ``ttl`` later
    (None: never), a fresh ``job_id`` unless given (give one derived from the business
    event, e.g. ``order-123-shipped``, to make a retried publish harmless). ``fields``:
    any other job field (``priority``, ``platforms``, ``dry_run``, ``campaign_id``...).
    Raises :class:`InvalidJob`."""
    created = now or datetime.now(UTC)
    payload: dict[str, Any] = dict(fields.pop("payload", {}))
    payload.update({k: v for k, v in (("title", title), ("body", body)) if v is not None})
    if data:
        payload["data"] = dict(data)
    spec: dict[str, Any] = {
        "job_id": job_id or f"job-{uuid.uuid4().hex}",
        "type": type,
        "audience": dict(audience),
        "payload": payload,
        "created_at": created,
        **fields,
    }
    if ttl is not None and "expires_at" not in spec:
        spec["expires_at"] = created + ttl
    return validate(spec)


class JobProducer:
    """Publishes jobs to the jobs topic. Use as ``async with JobProducer(settings) as p``."""

    def __init__(self, settings: KafkaSettings, *, topic: str | None = None) -> None:
        self.settings = settings
        self.topic = topic or settings.topics.jobs
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Connect; a broker that cannot be reached is a :class:`~pushfan.errors.SetupError`."""
        producer = make_producer(self.settings)
        await start_client(producer, self.settings)
        self._producer = producer

    async def stop(self) -> None:
        """Flush what is pending and disconnect."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def __aenter__(self) -> JobProducer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def publish(self, job: NotificationJob | Mapping[str, Any]) -> str:
        """Validate, send, wait for the broker's acknowledgement; the job id."""
        (job_id,) = await self.publish_many([job])
        return job_id

    async def publish_many(self, jobs: Iterable[NotificationJob | Mapping[str, Any]]) -> list[str]:
        """Validate every job first (an :class:`InvalidJob` sends none), then send them
        all and wait for every acknowledgement; their job ids, in order."""
        if self._producer is None:
            raise RuntimeError("JobProducer is not started (use it as an async context)")
        valid: Sequence[NotificationJob] = [validate(j) for j in jobs]
        futures = [
            await self._producer.send(self.topic, job.to_bytes(), key=job_key(job)) for job in valid
        ]
        await asyncio.gather(*futures)
        return [job.job_id for job in valid]
