"""Operations endpoints of running services, read over HTTP as Prometheus and a probe do:
the metrics move as the work does, /healthz and /readyz answer, consumer lag settles,
SIGTERM drains. The worker runs in this process; the cleanup consumer and the bridge run
as ``pushfan cleanup`` and ``pushfan bridge orders-shipped`` processes, configured
through the environment as in a container."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from pushfan.emulators.runner import Emulators
from pushfan.health import Health, serving
from pushfan.kafka import assign_all, ensure_topics, make_consumer, make_producer, start_client
from pushfan.metrics import Metrics
from pushfan.settings import KafkaSettings, Settings, subprocess_env
from pushfan.stack import free_port
from registry.cleanup import GROUP_ID as CLEANUP_GROUP
from registry.cleanup import Cleanup
from schemas import DeadLetter, InvalidTokenEvent, decode_job
from tests.worker_harness import (
    add_tokens,
    apns_token,
    eventually,
    fcm_token,
    make_job,
    own_topics,
    publish,
    read_records,
    running_worker,
    tag,
    wait_for_job,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def scrape_text(port: int) -> str:
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(port: int) -> Samples:
    return parse(await scrape_text(port))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def osettings(settings: Settings, migrated: str, emulators: Emulators) -> Settings:
    out = await own_topics(emulators.apply(settings))
    worker = out.worker.model_copy(update={"metrics_port": free_port(), "park_delay_s": 600.0})
    retry = out.retry.model_copy(update={"max_attempts": 2, "base_delay_s": 0.05})
    return out.model_copy(update={"worker": worker, "retry": retry})


async def test_a_running_workers_metrics_move_with_its_work(
    osettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    port = osettings.worker.metrics_port
    phones = [fcm_token(t, i) for i in range(5)]
    ipads = [apns_token(t, i) for i in range(3)]
    dead_phone, dead_ipad, flaky_phone = phones[0], ipads[0], phones[1]
    users = [f"ops-{t}-{i}" for i in range(8)]
    await add_tokens(
        db,
        [(users[i], "android", tok) for i, tok in enumerate(phones)]
        + [(users[5 + i], "ios", tok) for i, tok in enumerate(ipads)],
    )
    emulators.fcm.script.reset()
    emulators.apns.script.reset()
    emulators.fcm.script.configure(
        {"dead_tokens": [dead_phone], "token_errors": {flaky_phone: "UNAVAILABLE"}}
    )
    emulators.apns.script.configure({"dead_tokens": [dead_ipad]})
    job = make_job({"kind": "users", "user_ids": users})

    async with running_worker(osettings):

        async def ready() -> bool:
            try:
                status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/readyz")
            except urllib.error.URLError:  # not listening yet
                return False
            return status == 200

        await eventually(ready)
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        before = await scrape(port)
        assert value(before, "pushfan_ready", service="worker") == 1

        await publish(osettings, job)
        await wait_for_job(db, job.job_id)
        jobs_topic = osettings.kafka.topics.jobs

        async def lag_settled() -> bool:
            samples = await scrape(port)
            lags = [v for (n, labels), v in samples.items() if n == "pushfan_consumer_lag"]
            mine = [
                v
                for (n, labels), v in samples.items()
                if n == "pushfan_consumer_lag" and ("topic", jobs_topic) in labels
            ]
            return bool(lags) and bool(mine) and max(mine) == 0

        await eventually(lag_settled)  # committed: nothing behind on the jobs topic
        after = await scrape(port)
        status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/nothing")
        assert status == 404

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    sends = "pushfan_worker_sends_total"
    assert moved("pushfan_worker_jobs_total", outcome="completed") == 1
    assert moved(sends, platform="android", outcome="delivered", reason="") == 3
    assert moved(sends, platform="ios", outcome="delivered", reason="") == 2
    assert moved(sends, platform="android", outcome="invalid_token", reason="UNREGISTERED") == 1
    assert moved(sends, platform="ios", outcome="invalid_token", reason="Unregistered") == 1
    assert moved("pushfan_worker_targeted_tokens_total", platform="android") == 5
    # The flaky phone: two attempts (max_attempts 2), one of them a retry, then parked.
    assert moved("pushfan_worker_retries_total", platform="android") == 1
    assert moved("pushfan_worker_parked_tokens_total", platform="android") == 1
    responses = "pushfan_worker_provider_responses_total"
    assert moved(responses, service="fcm", status_class="2xx") == 3
    assert moved(responses, service="fcm", status_class="4xx") == 1  # UNREGISTERED: 404
    assert moved(responses, service="fcm", status_class="5xx") == 2  # UNAVAILABLE: 503
    assert moved(responses, service="apns", status_class="2xx") == 2
    assert moved(responses, service="apns", status_class="4xx") == 1  # Unregistered: 410
    # Every answered request is in the latency histogram, and none is still in flight.
    assert moved("pushfan_worker_send_seconds_count", service="fcm") == 6
    assert moved("pushfan_worker_send_seconds_count", service="apns") == 3
    assert moved("pushfan_worker_send_seconds_bucket", service="fcm", le="+Inf") == 6
    assert value(after, "pushfan_worker_send_seconds_sum", service="fcm") > 0
    assert value(after, "pushfan_worker_in_flight_requests", service="fcm") == 0
    # A one-page job: its users are done inline, outside any broadcast's progress.
    assert moved("pushfan_worker_users_done_total", mode="inline") == 8
    assert value(after, "pushfan_worker_users_done_total", mode="split") == 0
    assert value(after, "pushfan_worker_audience_users_total") == 0
    # Labels stay low-cardinality: no token, user or job id anywhere.
    text = repr(after)
    for secret in (*phones, *ipads, *users, job.job_id):
        assert secret not in text


async def test_readyz_follows_start_checks_and_drain() -> None:
    metrics = Metrics()
    health = Health("probe", metrics)
    port = free_port()

    def readyz() -> tuple[int, dict[str, str]]:
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        return status, json.loads(body)

    with serving(metrics, port, "PUSHFAN_TEST_PORT", health):
        assert readyz() == (503, {"status": "not_ready", "reason": "starting"})
        health.start()
        health.passed("database")
        assert readyz() == (200, {"status": "ready", "reason": "ready"})
        health.failed("broker", "KafkaConnectionError")
        assert readyz() == (503, {"status": "not_ready", "reason": "broker: KafkaConnectionError"})
        assert metrics.registry.get_sample_value("pushfan_ready", {"service": "probe"}) == 0
        health.passed("broker")
        assert readyz()[0] == 200
        health._passed["database"] = time.monotonic() - 60  # no check for a minute
        assert readyz() == (503, {"status": "not_ready", "reason": "no recent check of database"})
        health.passed("database")
        health.drain()
        assert readyz() == (503, {"status": "not_ready", "reason": "draining"})
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200  # alive while draining
    with pytest.raises(urllib.error.URLError):  # closed with the block
        get(f"http://127.0.0.1:{port}/healthz")


# -- the cleanup consumer and the bridge, as processes ----------------------------------


class Service:
    """A ``pushfan`` subcommand running as a process, its ops port, and every scrape of
    its ``/metrics`` taken (all of them are checked for ids)."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.scraped: list[str] = []

    async def get(self, path: str) -> tuple[int, bytes]:
        """Raises URLError when nothing listens on the port."""
        return await asyncio.to_thread(get, f"http://127.0.0.1:{self.port}{path}")

    async def scrape(self) -> Samples:
        text = await scrape_text(self.port)
        self.scraped.append(text)
        return parse(text)

    async def readyz(self) -> tuple[int, dict[str, str]] | None:
        """/readyz's status and JSON body; None once the port is closed."""
        try:
            status, body = await self.get("/readyz")
        except urllib.error.URLError:
            return None
        return status, json.loads(body)

    def stderr(self) -> str:
        return self.log.read_text()


@contextlib.asynccontextmanager
async def service(
    settings: Settings, port: int, log: Path, *command: str
) -> AsyncIterator[Service]:
    """``pushfan COMMAND`` with exactly ``settings`` in its environment, until /readyz
    answers 200; killed at the end of the block if it is still running."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pushfan.cli",
            *command,
            env=subprocess_env(settings),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
    running = Service(proc, port, log)
    try:

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"{command} exited {proc.returncode}:\n{running.stderr()}")
            answer = await running.readyz()
            return answer is not None and answer[0] == 200

        await eventually(ready, within=60, every=0.2)
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def group_offsets(
    kafka: KafkaSettings, topic: str, group: str
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """``group``'s committed offsets on ``topic`` and the topic's end offsets, read by a
    client that does not join the group."""
    reader = make_consumer(kafka, group_id=group)
    await start_client(reader, kafka)
    try:
        await assign_all(reader, topic)
        partitions = sorted(reader.assignment())
        committed = {p: await reader.committed(p) or 0 for p in partitions}
        ends: dict[TopicPartition, int] = await reader.end_offsets(partitions)
        return committed, ends
    finally:
        await reader.stop()


def lags(samples: Samples, group: str, topic: str) -> dict[str, float]:
    """``pushfan_consumer_lag`` of ``group`` on ``topic``, by partition."""
    out = {}
    for (name, labels), v in samples.items():
        found = dict(labels)
        if name == "pushfan_consumer_lag" and (found["group"], found["topic"]) == (group, topic):
            out[found["partition"]] = v
    return out


async def produce(kafka: KafkaSettings, topic: str, values: list[bytes]) -> None:
    producer = make_producer(kafka)
    await start_client(producer, kafka)
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


def assert_no_ids(scraped: list[str], ids: list[str]) -> None:
    """Labels stay low-cardinality: no token, user, order or job id in any scrape."""
    assert scraped
    for text in scraped:
        leaked = [i for i in ids if i in text]
        assert leaked == []


PARTITIONS = 4


@pytest.fixture
async def csettings(settings: Settings, migrated: str) -> Settings:
    """Topics of the test's own, the cleanup's ops port, and a statement timeout that
    outlasts the row locks the test holds."""
    out = await own_topics(settings, partitions=PARTITIONS)
    hygiene = out.hygiene.model_copy(update={"cleanup_metrics_port": free_port()})
    database = out.database.model_copy(update={"statement_timeout_ms": 120_000})
    return out.model_copy(update={"hygiene": hygiene, "database": database})


async def test_the_cleanup_process_reports_its_work_its_lag_and_its_drain(
    csettings: Settings, db: asyncpg.Pool, tmp_path: Path
) -> None:
    t = tag()
    phones, ipads = [fcm_token(t, i) for i in range(2)], [apns_token(t, i) for i in range(2)]
    later = [fcm_token(t, 10 + i) for i in range(3)]  # reported while their rows are locked
    users = [f"gone-{t}-{i}" for i in range(7)]
    tokens = [*phones, *ipads, *later]
    platforms = ["android", "android", "ios", "ios", "android", "android", "android"]
    await add_tokens(db, list(zip(users, platforms, tokens, strict=True)))
    job_id = f"job-{t}"
    observed = datetime.now(UTC) + timedelta(seconds=5)  # after the rows' registration

    def event(token: str, platform: str, reason: str) -> bytes:
        return InvalidTokenEvent.model_validate(
            {
                "token": token,
                "platform": platform,
                "reason": reason,
                "observed_at": observed,
                "job_id": job_id,
            }
        ).to_bytes()

    topic = csettings.kafka.topics.invalid_tokens
    port = csettings.hygiene.cleanup_metrics_port
    async with service(csettings, port, tmp_path / "cleanup.log", "cleanup") as cleanup:
        status, body = await cleanup.get("/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        before = await cleanup.scrape()
        assert value(before, "pushfan_ready", service="cleanup") == 1

        # Dead tokens reported by both platforms, and an event that does not parse.
        await produce(
            csettings.kafka,
            topic,
            [
                *(event(p, "android", "UNREGISTERED") for p in phones),
                *(event(i, "ios", "Unregistered") for i in ipads),
                b'{"token": "not an event"}',
            ],
        )

        async def committed(n: int) -> Samples | None:
            samples = await cleanup.scrape()
            moved = value(samples, "pushfan_cleanup_committed_events_total") - value(
                before, "pushfan_cleanup_committed_events_total"
            )
            return samples if moved >= n else None

        after = await eventually(lambda: committed(5))
        assert isinstance(after, dict)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("pushfan_cleanup_committed_events_total") == 5
        assert moved("pushfan_cleanup_skipped_events_total") == 1
        assert moved("pushfan_tokens_deactivated_total", reason="UNREGISTERED") == 2
        assert moved("pushfan_tokens_deactivated_total", reason="Unregistered") == 2
        rows = await db.fetch(
            "SELECT token, is_active, deactivation_reason FROM device_tokens WHERE token = ANY($1)",
            tokens,
        )
        state = {r["token"]: (r["is_active"], r["deactivation_reason"]) for r in rows}
        assert [state[p] for p in phones] == [(False, "UNREGISTERED")] * 2
        assert [state[i] for i in ipads] == [(False, "Unregistered")] * 2
        assert [state[x] for x in later] == [(True, None)] * 3

        async def settled() -> bool:
            found = lags(await cleanup.scrape(), CLEANUP_GROUP, topic)
            return len(found) == PARTITIONS and set(found.values()) == {0}

        await eventually(settled)

        # Three more reports, whose rows this test holds locked: the batch is read but
        # cannot be written, so nothing is committed and the lag shows all three.
        lock = await db.acquire()
        tx = lock.transaction()
        await tx.start()
        try:
            await lock.execute(
                "SELECT 1 FROM device_tokens WHERE token = ANY($1) FOR UPDATE", later
            )
            await produce(
                csettings.kafka, topic, [event(x, "android", "UNREGISTERED") for x in later]
            )

            async def behind() -> bool:
                return sum(lags(await cleanup.scrape(), CLEANUP_GROUP, topic).values()) == 3

            await eventually(behind)

            async def writing() -> bool:
                # The cleanup holds the batch: its writes wait for this test's locks.
                blocked = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    await lock.fetchval("SELECT pg_backend_pid()"),
                )
                return bool(blocked)

            await eventually(writing)

            # SIGTERM: not ready (draining) at once, alive, and still finishing the batch.
            cleanup.proc.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return await cleanup.readyz() == (
                    503,
                    {"status": "not_ready", "reason": "draining"},
                )

            await eventually(draining)
            assert (await cleanup.get("/healthz"))[0] == 200
            assert value(await cleanup.scrape(), "pushfan_ready", service="cleanup") == 0
            await asyncio.sleep(0.5)
            assert cleanup.proc.returncode is None  # waits for the batch it holds
        finally:
            await tx.rollback()
            await db.release(lock)

        # The batch is written and committed, then the process exits cleanly.
        assert await asyncio.wait_for(cleanup.proc.wait(), 60) == 0, cleanup.stderr()

    assert "Traceback" not in cleanup.stderr()

    async def inactive() -> int:
        found: int = await db.fetchval(
            "SELECT count(*) FROM device_tokens WHERE token = ANY($1) AND NOT is_active", later
        )
        return found

    # The batch it held (its polls may have caught one, two or all three reports) was
    # written and committed, nothing more: one committed offset per token deactivated.
    done, ends = await group_offsets(csettings.kafka, topic, CLEANUP_GROUP)
    assert sum(ends.values()) == 8
    assert 1 <= await inactive() == sum(done.values()) - 5
    # What it had not read is the group's next member's: nothing is lost.
    stop = asyncio.Event()
    rest = Cleanup(csettings.kafka, db, Metrics())
    await rest.start()
    task = asyncio.create_task(rest.run(stop))
    try:

        async def caught_up() -> bool:
            done, ends = await group_offsets(csettings.kafka, topic, CLEANUP_GROUP)
            return done == ends

        await eventually(caught_up)
    finally:
        stop.set()
        await task
        await rest.close()
    assert await inactive() == 3
    assert_no_ids(cleanup.scraped, [*tokens, *users, job_id])


@pytest.fixture
async def bsettings(settings: Settings) -> Settings:
    """Topics, a business topic and a bridge group of the test's own; the bridge's ops
    port."""
    out = await own_topics(settings, partitions=PARTITIONS)
    t = tag()
    bridge = out.bridge.model_copy(
        update={
            "topic": f"orders-{t}.shipped",
            "group_id": f"bridge-{t}",
            "metrics_port": free_port(),
        }
    )
    await ensure_topics(out.kafka, also=[bridge.topic])
    return out.model_copy(update={"bridge": bridge})


async def test_the_bridge_process_reports_its_events_its_lag_and_stops_on_sigterm(
    bsettings: Settings, tmp_path: Path
) -> None:
    t = tag()
    users = [f"buyer-{t}-{i}" for i in range(3)]
    orders = [f"{t}-{i}" for i in range(3)]
    jobs = [f"order-{o}-shipped" for o in orders]
    topic, group = bsettings.bridge.topic, bsettings.bridge.group_id
    port = bsettings.bridge.metrics_port

    async with service(
        bsettings, port, tmp_path / "bridge.log", "bridge", "orders-shipped"
    ) as bridge:
        status, body = await bridge.get("/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        before = await bridge.scrape()
        assert value(before, "pushfan_ready", service="bridge") == 1
        events = "pushfan_bridge_events_total"
        assert value(before, events, outcome="published") == 0  # exported from the start
        assert value(before, events, outcome="dead_lettered") == 0

        no_user = json.dumps({"order_id": f"{t}-x"}).encode()
        await produce(
            bsettings.kafka,
            topic,
            [
                *(
                    json.dumps({"order_id": o, "user_id": u, "carrier": "DHL"}).encode()
                    for o, u in zip(orders, users, strict=True)
                ),
                no_user,
            ],
        )

        async def counted() -> Samples | None:
            samples = await bridge.scrape()
            return samples if value(samples, events, outcome="published") >= 3 else None

        after = await eventually(counted)
        assert isinstance(after, dict)
        assert value(after, events, outcome="published") == 3
        published = await read_records(bsettings, bsettings.kafka.topics.jobs, 3)
        assert sorted(decode_job(r.value or b"").job_id for r in published) == jobs

        async def dead_lettered() -> bool:
            return value(await bridge.scrape(), events, outcome="dead_lettered") == 1

        await eventually(dead_lettered)
        (letter,) = await read_records(bsettings, bsettings.kafka.topics.dead_letter, 1)
        assert DeadLetter.from_bytes(letter.value or b"").original == no_user

        async def settled() -> bool:
            found = lags(await bridge.scrape(), group, topic)
            return len(found) == PARTITIONS and set(found.values()) == {0}

        await eventually(settled)

        # SIGTERM: /readyz stops answering 200; its first other answer, if the port is
        # still open, says why; then the process exits cleanly.
        bridge.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> tuple[int, dict[str, str]] | str:
            answer = await bridge.readyz()
            return "closed" if answer is None else answer if answer[0] != 200 else ""

        seen = await eventually(not_ready)
        assert seen in ("closed", (503, {"status": "not_ready", "reason": "draining"}))
        assert await asyncio.wait_for(bridge.proc.wait(), 60) == 0, bridge.stderr()

    assert "Traceback" not in bridge.stderr()
    done, ends = await group_offsets(bsettings.kafka, topic, group)
    assert done == ends
    assert sum(ends.values()) == 4
    assert_no_ids(bridge.scraped, [*users, *orders, *jobs])
