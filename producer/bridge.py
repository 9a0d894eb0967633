"""The fulfilment bridge (``pushfan bridge orders-shipped``): "order shipped" events from a
system we do not control become notification jobs, without changing the producing side.

An event (:class:`OrderShipped`) is a JSON object: ``order_id`` and ``user_id`` (strings
or integers), optional ``carrier`` and http(s) ``tracking_url``, other fields ignored.
:func:`job_for` makes it a job for that user. Contract of :class:`OrdersShippedBridge`:

- **Idempotent on the order.** The job id, ``order-<order_id>-shipped``, comes from the
  event alone. The worker's ledger skips a job id it has finished, and a one-user job is
  keyed ``user:<id>`` (:func:`producer.jobs.job_key`), so both copies of an event land in
  one partition, the second taken after the first is done: it notifies once.
- **Commit after acknowledgement.** A batch's records are all sent at once, every
  acknowledgement is awaited, then offset + 1 of each partition is committed. A crash
  between send and commit replays the batch: the same job ids, dropped by the worker as
  duplicates (dead letters are at least once). A failed send stops the bridge uncommitted.
- **Bad events move on.** Not a JSON object (``decode``) or against the contract
  (``validation``: no ``order_id``, an ``ftp://`` URL, a job over the payload limit): a
  :class:`schemas.DeadLetter` with the reason and the original bytes, on the dead-letter
  topic. Waiting cannot make it valid.
- **Rebalances and stops** wait for the batch in flight to be acknowledged and committed.
- **The business topic is not ours**: never created here. Missing at start, it is a
  warning and checked every :data:`TOPIC_CHECK_S` s; subscribed to only once it exists
  (a client asks the broker to auto-create the topics it subscribes to).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, NamedTuple, Self, TypeAlias
from urllib.parse import urlsplit

import pydantic
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from producer.jobs import InvalidJob, build_job, job_key
from pushfan.health import Health, serving, watching
from pushfan.kafka import make_consumer, make_producer, start_client
from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from pushfan.settings import BridgeSettings, Settings
from schemas import DeadLetter, NotificationJob, UserId, format_validation_error

log = get_logger("pushfan.bridge")

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
ErrorKind: TypeAlias = Literal["decode", "validation"]

TOPIC_CHECK_S = 5.0
JOB_ID_FORMAT = "order-{order_id}-shipped"
# The job id must be a JobId (128 characters of [A-Za-z0-9._:-]); an order id that cannot
# be carried in it verbatim is refused rather than mangled, which could merge two orders.
MAX_ORDER_ID = 128 - len(JOB_ID_FORMAT.format(order_id=""))


def _int_as_str(value: object) -> object:
    # Fulfilment systems often send numeric ids; booleans and floats are not ids.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _blank_is_absent(value: object) -> object:
    # "carrier": "" means the same as no carrier in most producers' JSON.
    return None if isinstance(value, str) and not value.strip() else value


def _check_tracking_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
        raise PydanticCustomError("tracking_url", "must be an http(s):// URL without whitespace")
    return url


OrderId = Annotated[
    str,
    pydantic.StringConstraints(
        min_length=1, max_length=MAX_ORDER_ID, pattern=r"^[A-Za-z0-9._:-]+$"
    ),
    BeforeValidator(_int_as_str),
]
Carrier = Annotated[str, pydantic.StringConstraints(max_length=100)]
TrackingUrl = Annotated[str, Field(max_length=2048), AfterValidator(_check_tracking_url)]


class OrderShipped(BaseModel):
    """One event of the business topic: the fulfilment system's contract, not ours, so
    unknown fields are ignored (they may add some any day) and ids may be integers."""

    # hide_input_in_errors: str(exc) must not echo user ids into a log line.
    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    order_id: OrderId
    user_id: Annotated[UserId, BeforeValidator(_int_as_str)]
    carrier: Annotated[Carrier | None, BeforeValidator(_blank_is_absent)] = None
    tracking_url: Annotated[TrackingUrl | None, BeforeValidator(_blank_is_absent)] = None

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Parse one record's value; raises :class:`pydantic.ValidationError`."""
        return cls.model_validate_json(raw)

    @property
    def job_id(self) -> str:
        """The idempotency key of this event's job: ``order-<order_id>-shipped``."""
        return JOB_ID_FORMAT.format(order_id=self.order_id)

    def fields(self) -> dict[str, str]:
        """The template fields this event carries (absent ones left out)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def render(template: str, fields: Mapping[str, str]) -> str | None:
    """``template`` filled from ``fields``; None (left out of the notification) if it is
    empty or names a field the event lacks: no " is on its way with it." without a
    carrier. Unknown placeholders were refused with the settings."""
    try:
        return template.format_map(fields) or None
    except KeyError:
        return None


def job_for(event: OrderShipped, settings: BridgeSettings, now: datetime) -> NotificationJob:
    """``event``'s job: to its user, id ``order-<id>-shipped``, created ``now``; type,
    priority, expiry and :func:`render`-ed templates from ``settings``; ``data`` the order
    id, carrier and tracking URL it has. :class:`~producer.jobs.InvalidJob` if too big."""
    fields = event.fields()
    return build_job(
        {"kind": "user", "user_id": event.user_id},
        type=settings.notification_type,
        title=render(settings.title, fields),
        body=render(settings.body, fields),
        data={k: v for k, v in fields.items() if k != "user_id"},  # the app has the user
        job_id=event.job_id,
        ttl=timedelta(seconds=settings.ttl_s) if settings.ttl_s else None,
        now=now,
        priority=settings.priority,
    )


class _Out(NamedTuple):  # what one event becomes: a record for one of our topics
    topic: str
    value: bytes
    key: bytes | None
    outcome: str  # a Metrics.bridge_events label


class OrdersShippedBridge(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped aiokafka
    """``start``, ``run(stop)``, ``close``; its own rebalance listener, as in cleanup."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        consumer_options: Mapping[str, Any] | None = None,  # tests: a short session
    ) -> None:
        self.kafka = settings.kafka
        self.config = settings.bridge
        self.metrics = metrics
        self.clock = clock
        self.consumer = make_consumer(
            self.kafka, group_id=self.config.group_id, **(consumer_options or {})
        )
        self.producer = make_producer(self.kafka)
        # Held from a batch's first send to its commit; a revocation waits for it.
        self._batch_lock = asyncio.Lock()

    async def start(self) -> bool:
        """Connect (a SetupError if the broker cannot be reached); whether the business
        topic exists now. Nothing is subscribed yet: :meth:`run` does that."""
        await start_client(self.producer, self.kafka)
        try:
            await start_client(self.consumer, self.kafka)
            exists = await self._topic_exists()
        except BaseException:
            await self.close()
            raise
        if not exists:
            log.warning(
                "the bridge's topic does not exist; waiting for it (the fulfilment system"
                " owns it, pushfan does not create it; see PUSHFAN_BRIDGE__TOPIC)",
                topic=self.config.topic,
            )
        return exists

    async def close(self) -> None:
        """Leave the group, then flush and close the producer."""
        await self.consumer.stop()
        await self.producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Translate batches until ``stop`` is set; the batch in hand is finished first."""
        while not await self._topic_exists():
            try:  # waiting for the fulfilment team, not polling it hard
                await asyncio.wait_for(stop.wait(), TOPIC_CHECK_S)
                return
            except TimeoutError:
                continue
        self.consumer.subscribe([self.config.topic], listener=self)
        log.info("bridge consuming", topic=self.config.topic, group=self.config.group_id)
        while not stop.is_set():
            polled = await self.consumer.getmany(timeout_ms=500, max_records=self.config.batch_size)
            if polled:
                await self.process(polled)

    async def process(self, polled: Mapping[TopicPartition, list[Record]]) -> None:
        """One batch: send every event's job or dead letter, await every acknowledgement,
        then commit. Records of partitions no longer ours are left to their new owner."""
        async with self._batch_lock:
            owned = self.consumer.assignment()
            batch = {tp: records for tp, records in polled.items() if records and tp in owned}
            if not batch:
                return
            now = self.clock()
            outcomes: Counter[str] = Counter()
            acks = []
            for records in batch.values():
                for record in records:
                    out = self._translate(record, now)
                    # send() only queues the record; its future resolves on the broker's ack
                    acks.append(await self.producer.send(out.topic, out.value, key=out.key))
                    outcomes[out.outcome] += 1
            await asyncio.gather(*acks)
            for outcome, n in outcomes.items():
                self.metrics.child(self.metrics.bridge_events, outcome).inc(n)
            try:
                await self.consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items()})
            except (CommitFailedError, IllegalStateError) as exc:
                # The group moved on: the new owner sends the batch again, and the worker
                # drops those jobs as duplicates.
                log.warning("bridge batch sent but not committed", error=repr(exc))
            log.info("bridge batch", events=sum(outcomes.values()), **outcomes)

    def _translate(self, record: Record, now: datetime) -> _Out:
        try:
            job = job_for(OrderShipped.from_bytes(record.value or b""), self.config, now)
        except pydantic.ValidationError as exc:
            return self._dead_letter(record, format_validation_error(exc), _kind(exc), now)
        except InvalidJob as exc:
            return self._dead_letter(record, f"the job would be invalid: {exc}", "validation", now)
        return _Out(self.kafka.topics.jobs, job.to_bytes(), job_key(job), "published")

    def _dead_letter(self, record: Record, error: str, kind: ErrorKind, now: datetime) -> _Out:
        letter = DeadLetter.of(record, error, kind, now)
        # The error names fields, never their values (format_validation_error): no ids here.
        at = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        log.warning("bridge dead-lettered an event", **at, error_kind=kind, error=error)
        return _Out(self.kafka.topics.dead_letter, letter.to_bytes(), record.key, "dead_lettered")

    async def _topic_exists(self) -> bool:
        # A metadata request for every topic: asking for this one by name could make a
        # broker with auto.create.topics.enable create it.
        return self.config.topic in await self.consumer.topics()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._batch_lock:  # the batch in flight is acknowledged and committed
            return

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None


def _kind(exc: pydantic.ValidationError) -> ErrorKind:
    """``decode`` for bytes that are not a JSON object, ``validation`` for the rest."""
    not_json = {"json_invalid", "json_type", "model_type"}  # model_type: not an object
    decode = any(e["type"] in not_json and not e["loc"] for e in exc.errors())
    return "decode" if decode else "validation"


async def run(
    settings: Settings,
    metrics: Metrics,
    stop: asyncio.Event,
    *,
    on_start: Callable[[bool], Any] | None = None,
    consumer_options: Mapping[str, Any] | None = None,
) -> None:
    """The bridge of ``pushfan bridge orders-shipped`` until ``stop``, with /metrics,
    /healthz and /readyz on ``PUSHFAN_BRIDGE__METRICS_PORT`` (0: not served; in-process,
    pass the host's ``metrics`` and set it 0). ``on_start(topic_exists)`` is called once
    connected; a broker that cannot be reached is a :class:`~pushfan.errors.SetupError`."""
    health = Health("bridge", metrics)
    port = settings.bridge.metrics_port
    with serving(metrics, port, "PUSHFAN_BRIDGE__METRICS_PORT", health):
        bridge = OrdersShippedBridge(settings, metrics, consumer_options=consumer_options)
        exists = await bridge.start()
        try:
            group = settings.bridge.group_id
            async with watching(health, stop, consumer=bridge.consumer, group=group):
                if on_start is not None:
                    on_start(exists)
                await bridge.run(stop)
        finally:
            await bridge.close()
