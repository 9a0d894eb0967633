"""Operations endpoints of a running worker, read over HTTP as Prometheus and a probe do:
the metrics move as the work does, /healthz and /readyz answer."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pushfan.emulators.runner import Emulators
from pushfan.health import Health, serving
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from pushfan.stack import free_port
from tests.worker_harness import (
    add_tokens,
    apns_token,
    eventually,
    fcm_token,
    make_job,
    own_topics,
    publish,
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


async def scrape(port: int) -> Samples:
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


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
    assert moved("pushfan_worker_users_done_total") == 8
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
