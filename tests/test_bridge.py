"""The fulfilment bridge (``producer/bridge.py``): order-shipped events on a business topic
become jobs, on the real broker, and go out through a real worker once per order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from producer import bridge as bridge_module
from producer.bridge import OrderShipped, job_for, run
from producer.jobs import InvalidJob
from pushfan.emulators.runner import Emulators
from pushfan.kafka import ensure_topics, make_producer, start_client
from pushfan.metrics import Metrics
from pushfan.settings import (
    BRIDGE_TEMPLATE_FIELDS,
    BridgeSettings,
    Settings,
    load_settings,
)
from schemas import DeadLetter, decode_job, format_validation_error
from tests.worker_harness import (
    add_tokens,
    apns_token,
    deliveries,
    eventually,
    fcm_token,
    own_topics,
    read_records,
    running_worker,
    tag,
    wait_for_job,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


async def with_bridge(settings: Settings, *, create: bool = True, **changes: Any) -> Settings:
    """``settings`` with a business topic (created unless not ``create``) and a bridge
    group of this test's own."""
    t = tag()
    bridge = BridgeSettings.model_validate(
        {
            **settings.bridge.model_dump(),
            "topic": f"orders-{t}.shipped",
            "group_id": f"bridge-{t}",
            **changes,
        }
    )
    out = settings.model_copy(update={"bridge": bridge})
    if create:
        await ensure_topics(out.kafka, also=[bridge.topic])
    return out


@pytest.fixture
async def bsettings(settings: Settings) -> Settings:
    return await with_bridge(await own_topics(settings))


# The broker here starts a group at generation 0, for which aiokafka sends no LeaveGroup:
# a bridge restarted in the same group waits for its predecessor's session to time out.
QUICK_GROUP = {"session_timeout_ms": 3_000, "heartbeat_interval_ms": 1_000}


@contextlib.asynccontextmanager
async def running_bridge(
    settings: Settings, metrics: Metrics, on_start: Callable[[bool], None] | None = None
) -> AsyncIterator[None]:
    """The bridge in this process until the block ends, then a graceful stop."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        run(settings, metrics, stop, on_start=on_start, consumer_options=QUICK_GROUP)
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def emit(settings: Settings, *values: bytes, key: bytes = b"fulfilment") -> None:
    """What the fulfilment system does: events on its topic, in order, one partition."""
    producer = make_producer(settings.kafka)
    await start_client(producer, settings.kafka)
    try:
        for value in values:
            await producer.send_and_wait(settings.bridge.topic, value, key=key)
    finally:
        await producer.stop()


def shipped(order_id: object, user_id: object, **fields: object) -> bytes:
    return json.dumps({"order_id": order_id, "user_id": user_id, **fields}).encode()


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- the event and its job, no broker ---------------------------------------------------


def test_an_event_becomes_the_users_job_keyed_by_the_order() -> None:
    event = OrderShipped.from_bytes(
        shipped(123, 42, carrier="DHL", tracking_url="https://t.example/1", warehouse="W3")
    )
    job = job_for(event, BridgeSettings(), NOW)

    assert job.job_id == "order-123-shipped"
    assert job.type == "order_shipped"
    assert job.priority == "normal"
    assert job.audience.model_dump() == {"kind": "user", "user_id": "42"}
    assert job.payload.title == "Your order 123 has shipped"
    assert job.payload.body == "DHL is on its way with it."
    assert job.payload.data == {
        "order_id": "123",
        "carrier": "DHL",
        "tracking_url": "https://t.example/1",
    }
    assert (job.created_at, job.expires_at) == (NOW, NOW + timedelta(days=1))


def test_without_a_carrier_the_body_naming_it_is_left_out() -> None:
    event = OrderShipped.from_bytes(shipped("A-7", "u7", carrier=""))
    job = job_for(event, BridgeSettings(), NOW)
    assert (job.payload.title, job.payload.body) == ("Your order A-7 has shipped", None)
    assert job.payload.data == {"order_id": "A-7"}


def test_templates_type_priority_and_ttl_come_from_the_settings() -> None:
    config = BridgeSettings(
        notification_type="shipping",
        title="",
        body="Track it: {tracking_url}",
        priority="urgent",
        ttl_s=0,
    )
    event = OrderShipped.from_bytes(shipped("9", "u9", tracking_url="http://t.example/9"))
    job = job_for(event, config, NOW)
    assert (job.type, job.priority, job.expires_at) == ("shipping", "urgent", None)
    assert (job.payload.title, job.payload.body) == (None, "Track it: http://t.example/9")


@pytest.mark.parametrize(
    ("event", "says"),
    [
        ({"user_id": "1"}, "order_id: Field required"),
        ({"order_id": "", "user_id": "1"}, "order_id"),
        ({"order_id": "a/b", "user_id": "1"}, "order_id"),  # not carried by a job id
        ({"order_id": True, "user_id": "1"}, "order_id"),
        ({"order_id": "1", "user_id": 1.5}, "user_id"),
        ({"order_id": "1", "user_id": "1", "tracking_url": "ftp://t.example"}, "tracking_url"),
    ],
    ids=["no-order-id", "empty-order-id", "slash", "boolean", "float-user", "ftp-url"],
)
def test_the_event_contract_refuses(event: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        OrderShipped.from_bytes(json.dumps(event).encode())
    assert says in format_validation_error(caught.value)  # the dead letter's reason


def test_a_job_the_schema_refuses_is_an_invalid_job() -> None:
    config = BridgeSettings(body="{tracking_url} {tracking_url} {tracking_url}")
    event = OrderShipped.from_bytes(
        shipped("1", "u", tracking_url="https://t.example/" + "x" * 1500)
    )
    with pytest.raises(InvalidJob, match="payload"):
        job_for(event, config, NOW)


def test_the_template_fields_are_the_events_fields() -> None:
    assert tuple(OrderShipped.model_fields) == BRIDGE_TEMPLATE_FIELDS


@pytest.mark.parametrize(
    "template", ["Order {order} shipped", "{}", "{order_id.__class__}", "{order_id:d}", "{oops"]
)
def test_a_bad_template_is_a_settings_error(template: str) -> None:
    with pytest.raises(ValidationError, match="PUSHFAN_BRIDGE__TITLE"):
        load_settings(bridge={"title": template})


def test_a_bad_template_stops_the_command_with_one_line(service_env: dict[str, str]) -> None:
    env = {**service_env, "PUSHFAN_BRIDGE__BODY": "{carrier} has order {order}"}
    out = subprocess.run(
        [sys.executable, "-m", "pushfan.cli", "bridge", "orders-shipped"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("pushfan: invalid settings: bridge.body:")
    assert "unknown placeholder {order}" in out.stderr


# -- on the broker ----------------------------------------------------------------------


async def test_an_event_on_the_topic_becomes_one_job(bsettings: Settings) -> None:
    metrics = Metrics()
    await emit(bsettings, shipped(555, 42, carrier="UPS"))

    async with running_bridge(bsettings, metrics):
        (record,) = await read_records(bsettings, bsettings.kafka.topics.jobs, 1)
        await eventually(lambda: count(metrics, "pushfan_bridge_events_total", outcome="published"))

    job = decode_job(record.value or b"")
    assert record.key == b"user:42"
    assert job.job_id == "order-555-shipped"
    assert (job.payload.title, job.payload.body) == (
        "Your order 555 has shipped",
        "UPS is on its way with it.",
    )
    assert job.payload.data == {"order_id": "555", "carrier": "UPS"}
    assert count(metrics, "pushfan_bridge_events_total", outcome="published") == 1
    assert count(metrics, "pushfan_bridge_events_total", outcome="dead_lettered") == 0


async def test_bad_events_are_dead_lettered_and_offsets_committed(bsettings: Settings) -> None:
    bad_json, no_order = b'{"order_id": 1, "user_id": ', shipped(None, "u1")
    await emit(bsettings, bad_json, no_order, shipped("ok-1", "u1"))
    topics = bsettings.kafka.topics

    metrics = Metrics()
    async with running_bridge(bsettings, metrics):
        (job,) = await read_records(bsettings, topics.jobs, 1)
        letters = [
            DeadLetter.from_bytes(r.value or b"")
            for r in await read_records(bsettings, topics.dead_letter, 2)
        ]
    assert decode_job(job.value or b"").job_id == "order-ok-1-shipped"
    assert [(d.original, d.error_kind) for d in letters] == [
        (bad_json, "decode"),
        (no_order, "validation"),
    ]
    assert "Invalid JSON" in letters[0].error
    assert "order_id" in letters[1].error
    assert {d.topic for d in letters} == {bsettings.bridge.topic}
    assert count(metrics, "pushfan_bridge_events_total", outcome="dead_lettered") == 2

    # The same group again: it starts after what the first bridge committed.
    await emit(bsettings, shipped("ok-2", "u1"))
    async with running_bridge(bsettings, Metrics()):
        await read_records(bsettings, topics.jobs, 2)
    ids = [decode_job(r.value or b"").job_id for r in await read_records(bsettings, topics.jobs)]
    assert ids == ["order-ok-1-shipped", "order-ok-2-shipped"]
    assert len(await read_records(bsettings, topics.dead_letter)) == 2


async def test_an_event_delivered_twice_notifies_once(
    settings: Settings, migrated: str, emulators: Emulators, db: asyncpg.Pool
) -> None:
    """Through a real worker: the duplicate is dropped by the ledger, not by luck."""
    wsettings = await with_bridge(await own_topics(emulators.apply(settings)))
    emulators.fcm.script.reset()
    emulators.apns.script.reset()
    t = tag()
    user, phone, iphone = f"ship-{t}", fcm_token(t, 1), apns_token(t, 1)
    await add_tokens(db, [(user, "android", phone), (user, "ios", iphone)])
    first, second = shipped(f"{t}-1", user, carrier="DHL"), shipped(f"{t}-2", user)
    # The fulfilment system sends the first event twice (a retry it was unsure about).
    await emit(wsettings, first, first, second)

    worker_metrics, bridge_metrics = Metrics(), Metrics()
    async with running_worker(wsettings, worker_metrics), running_bridge(wsettings, bridge_metrics):
        done = [await wait_for_job(db, f"order-{t}-{n}-shipped") for n in (1, 2)]
        # One user's jobs share a partition: the second order was consumed after the copy.
        duplicates = count(worker_metrics, "pushfan_worker_jobs_total", outcome="duplicate")

    assert count(bridge_metrics, "pushfan_bridge_events_total", outcome="published") == 3
    assert duplicates == 1
    assert [(d.state, d.sent) for d in done] == [("completed", 2), ("completed", 2)]
    assert deliveries(emulators) == {phone: 2, iphone: 2}  # one per order on each device


async def test_a_topic_created_after_the_start_is_picked_up(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_module, "TOPIC_CHECK_S", 0.2)
    late = await with_bridge(await own_topics(settings), create=False)
    started: list[bool] = []

    async with running_bridge(late, Metrics(), started.append):
        await eventually(lambda: started)
        await ensure_topics(late.kafka, also=[late.bridge.topic])
        await emit(late, shipped("late-1", "u1"))
        (record,) = await read_records(late, late.kafka.topics.jobs, 1)

    assert started == [False]
    assert decode_job(record.value or b"").job_id == "order-late-1-shipped"


def start_then_sigterm(env: dict[str, str]) -> tuple[str, int, str]:
    """``pushfan bridge orders-shipped`` until its first line, then SIGTERM: that line,
    the exit status and stderr."""
    with subprocess.Popen(
        [sys.executable, "-m", "pushfan.cli", "bridge", "orders-shipped"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    return line, proc.returncode, err


async def test_a_missing_topic_is_a_warning_and_sigterm_stops_the_bridge(
    settings: Settings, service_env: dict[str, str]
) -> None:
    """A real process: the line it prints, the warning, and a clean stop on SIGTERM."""
    topic = f"missing-{tag()}.shipped"
    line, status, err = await asyncio.wait_for(
        asyncio.to_thread(start_then_sigterm, {**service_env, "PUSHFAN_BRIDGE__TOPIC": topic}),
        90,
    )
    assert line == f"pushfan bridge: {topic} -> {settings.kafka.topics.jobs}\n"
    assert status == 0, err
    # Said once, as a log line: it used to be logged and printed to stderr as well.
    (warning,) = [json.loads(x) for x in err.splitlines() if "does not exist" in x]
    assert (warning["level"], warning["topic"]) == ("warning", topic)
    assert "waiting for it" in warning["event"]
    assert "Traceback" not in err
    assert not await topic_exists(settings, topic)  # and the bridge did not create it


async def topic_exists(settings: Settings, topic: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    from pushfan.kafka import client_options

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()
