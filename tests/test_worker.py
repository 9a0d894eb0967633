"""The fanout worker end to end: real broker, real PostgreSQL, the FCM and APNs emulators."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from pydantic import SecretStr

from pushfan.db import migrate
from pushfan.emulators.runner import Emulators
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from registry import cleanup, store
from schemas import DeadLetter, InvalidTokenEvent
from tests.worker_harness import (
    add_segment,
    add_tokens,
    apns_token,
    deliveries,
    eventually,
    fcm_token,
    make_job,
    own_topics,
    publish,
    read_topic,
    running_worker,
    tag,
    until_none_active,
    wait_for_job,
    with_worker,
)
from worker import ledger
from worker import status as job_status


@pytest.fixture(autouse=True)
def fresh_scripts(emulators: Emulators) -> None:
    emulators.fcm.script.reset()
    emulators.apns.script.reset()


@pytest.fixture
async def wsettings(settings: Settings, migrated: str, emulators: Emulators) -> Settings:
    """Settings for one test's workers: its own topics and group, the emulators."""
    return await own_topics(emulators.apply(settings))


async def test_order_shipped_reaches_exactly_the_users_active_devices(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    user = f"u-{t}"
    pixel, tablet, iphone, old_phone = (
        fcm_token(t, 1),
        fcm_token(t, 2),
        apns_token(t, 3),
        fcm_token(t, 4),
    )
    for token, platform, device in (
        (pixel, "android", "pixel"),
        (tablet, "android", "tablet"),
        (iphone, "ios", "iphone"),
        (old_phone, "android", "old"),
    ):
        await store.register(db, user, store.Registration(token, platform, f"{t}-{device}", "app"))
    assert await store.logout_token(db, user, old_phone) == 1
    # Somebody else's device must not hear about this order.
    stranger = fcm_token(t, 5)
    await store.register(db, f"other-{t}", store.Registration(stranger, "android", f"{t}-x", "app"))

    job = make_job({"kind": "user", "user_id": user})
    async with running_worker(wsettings):
        await publish(wsettings, job)
        done = await wait_for_job(db, job.job_id)

    assert done.state == "completed"
    assert deliveries(emulators) == {pixel: 1, tablet: 1, iphone: 1}
    assert (done.targeted, done.sent, done.invalid, done.failed) == (3, 3, 0, 0)
    assert done.targeted_by_platform == {"android": 2, "ios": 1, "web": 0}


async def test_broadcast_to_a_segment_reaches_every_token_once_across_two_workers(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    users = [f"s{t}-{i:06d}" for i in range(25_000)]
    rows = [(u, "android", fcm_token(t, i)) for i, u in enumerate(users)]
    rows += [(u, "ios", apns_token(t, i)) for i, u in enumerate(users) if i % 3 == 0]
    await add_tokens(db, rows)
    await add_segment(db, f"seg-{t}", users)
    job = make_job({"kind": "segment", "segment": f"seg-{t}"}, type="news")

    first, second = Metrics(), Metrics()
    async with running_worker(wsettings, first), running_worker(wsettings, second):
        await publish(wsettings, job)
        done = await wait_for_job(db, job.job_id, within=120)

    got = deliveries(emulators)
    assert done.state == "completed"
    assert len(got) == len(rows)
    assert set(got) == {token for _, _, token in rows}
    assert set(got.values()) == {1}
    assert (done.audience_users, done.users_done, done.sent) == (25_000, 25_000, len(rows))
    assert done.shards_done == done.shards_total == 5
    # Both workers sent a share of the shards.
    shares = [sample(m, "pushfan_worker_users_done_total", mode="split") for m in (first, second)]
    assert sum(shares) == 25_000
    assert min(shares) > 0, shares
    # The dashboard's progress: the audience counted at the split (by the worker that took
    # the job) and the users done (by both) agree once it has finished.
    audience = sum(sample(m, "pushfan_worker_audience_users_total") for m in (first, second))
    assert audience == sum(shares)
    assert [
        sample(m, "pushfan_worker_users_done_total", mode="inline") for m in (first, second)
    ] == [0, 0]


async def test_a_page_fenced_off_by_a_new_owner_is_not_counted_as_done(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    """Another owner takes the shard mid-broadcast: the ledger refuses the worker's next
    page, and the worker's progress counter follows the ledger, not its sends."""
    t = tag()
    users = [f"f{t}-{i:05d}" for i in range(3_000)]
    await add_tokens(db, [(u, "android", fcm_token(t, i)) for i, u in enumerate(users)])
    await add_segment(db, f"seg-{t}", users)
    emulators.fcm.script.configure({"latency_ms": 100})  # a page every ~0.1 s or more
    settings = with_worker(wsettings, page_size=100, shard_pages=100)  # one shard, 30 pages
    job = make_job({"kind": "segment", "segment": f"seg-{t}"}, type="news")
    metrics = Metrics()

    async def started() -> bool:
        found = await job_status.status(db, job.job_id)
        return found is not None and found.users_done >= 500

    async with running_worker(settings, metrics):
        await publish(settings, job)
        await eventually(started)
        assert await ledger.claim(db, job.job_id, 0, "another-worker") is not None
        await eventually(lambda: sample(metrics, "pushfan_worker_shards_running") == 0)
        recorded = await job_status.status(db, job.job_id)

    assert recorded is not None
    assert recorded.users_done < 3_000  # fenced off before the end
    done = sample(metrics, "pushfan_worker_users_done_total", mode="split")
    assert done == recorded.users_done
    # The refused page was sent (and its sends counted), but not counted as done.
    assert sample(metrics, "pushfan_worker_pages_total") * 100 == done + 100


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"{name}{labels} is not exported"
    return found


async def test_a_malformed_job_is_dead_lettered_and_the_next_job_goes_out(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    token = fcm_token(t, 1)
    await add_tokens(db, [(f"u-{t}", "android", token)])
    no_payload = make_job({"kind": "user", "user_id": f"u-{t}"}).model_dump(mode="json")
    del no_payload["payload"]
    good = make_job({"kind": "user", "user_id": f"u-{t}"})

    async with running_worker(wsettings):
        await publish(wsettings, b"{not json", json.dumps(no_payload).encode(), good)
        done = await wait_for_job(db, good.job_id)
        letters = [
            DeadLetter.from_bytes(raw)
            for raw in await read_topic(wsettings, wsettings.kafka.topics.dead_letter, 2)
        ]

    assert done.state == "completed"
    assert deliveries(emulators) == {token: 1}
    by_kind = {letter.error_kind: letter for letter in letters}
    assert by_kind["decode"].original == b"{not json"
    assert "JSON" in by_kind["decode"].error
    assert by_kind["validation"].original == json.dumps(no_payload).encode()
    assert by_kind["validation"].error == "payload: Field required"
    assert {letter.topic for letter in letters} == {wsettings.kafka.topics.jobs}


async def test_an_expired_job_sends_nothing_and_a_dry_run_only_counts(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    users = [f"d{t}-{i:04d}" for i in range(2_500)]
    rows = [(u, "android", fcm_token(t, i)) for i, u in enumerate(users)]
    rows += [(u, "ios", apns_token(t, i)) for i, u in enumerate(users) if i % 5 == 0]
    await add_tokens(db, rows)
    await add_segment(db, f"seg-{t}", users)
    now = datetime.now(UTC)
    expired = make_job(
        {"kind": "user", "user_id": users[0]},
        created_at=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=1),
    )
    preview = make_job({"kind": "segment", "segment": f"seg-{t}"}, dry_run=True)

    async with running_worker(wsettings):
        await publish(wsettings, expired, preview)
        gone = await wait_for_job(db, expired.job_id)
        counted = await wait_for_job(db, preview.job_id)

    assert deliveries(emulators) == {}
    assert (gone.state, gone.targeted, gone.sent) == ("expired", 0, 0)
    assert counted.state == "completed"
    assert counted.dry_run
    assert counted.targeted_by_platform == {"android": 2_500, "ios": 500, "web": 0}
    assert (counted.targeted, counted.sent, counted.users_done) == (3_000, 0, 2_500)


async def test_dead_tokens_are_reported_and_skipped_after_cleanup(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    users = [f"x{t}-{i:03d}" for i in range(300)]
    android = {u: fcm_token(t, i) for i, u in enumerate(users)}
    ios = {u: apns_token(t, i) for i, u in enumerate(users)}
    await add_tokens(db, [(u, "android", tok) for u, tok in android.items()])
    await add_tokens(db, [(u, "ios", tok) for u, tok in ios.items()])
    await add_segment(db, f"seg-{t}", users)
    dead_fcm = {android[u] for u in users[:7]}
    dead_apns = {ios[u] for u in users[10:13]}
    emulators.fcm.script.configure({"dead_tokens": sorted(dead_fcm)})
    emulators.apns.script.configure({"dead_tokens": sorted(dead_apns)})

    first = make_job({"kind": "segment", "segment": f"seg-{t}"}, type="news")
    started = datetime.now(UTC).date()
    async with running_worker(wsettings):
        await publish(wsettings, first)
        done = await wait_for_job(db, first.job_id)
        events = [
            InvalidTokenEvent.from_bytes(raw)
            for raw in await read_topic(wsettings, wsettings.kafka.topics.invalid_tokens, 10)
        ]
    assert (done.sent, done.invalid) == (600 - 10, 10)
    assert {(e.token, e.reason) for e in events} == {(tok, "UNREGISTERED") for tok in dead_fcm} | {
        (tok, "Unregistered") for tok in dead_apns
    }
    assert {e.job_id for e in events} == {first.job_id}
    # Delivered tokens are marked with today's date (UTC); dead ones are not.
    marked = await _delivery_marks(db, [*android.values(), *ios.values()])
    days = {started, datetime.now(UTC).date()}
    assert set(marked) == (set(android.values()) | set(ios.values())) - dead_fcm - dead_apns
    assert {day for day, _ in marked.values()} <= days

    stop = asyncio.Event()
    sweeper = cleanup.Cleanup(wsettings.kafka, db, Metrics(), group_id=f"clean-{t}")
    await sweeper.start()
    task = asyncio.create_task(sweeper.run(stop))
    try:
        await until_none_active(db, dead_fcm | dead_apns)
    finally:
        stop.set()
        await task
        await sweeper.close()

    emulators.fcm.script.reset()
    emulators.apns.script.reset()
    second = make_job({"kind": "segment", "segment": f"seg-{t}"}, type="news")
    async with running_worker(wsettings):
        await publish(wsettings, second)
        again = await wait_for_job(db, second.job_id)
    assert (again.targeted, again.sent, again.invalid) == (590, 590, 0)
    assert not (dead_fcm | dead_apns) & set(deliveries(emulators))
    # A second delivery the same day leaves the marks as they were: the same row
    # versions (xmin), not rewritten.
    if {day for day, _ in marked.values()} == {datetime.now(UTC).date()}:
        assert await _delivery_marks(db, list(marked)) == marked


async def _delivery_marks(db: asyncpg.Pool, tokens: list[str]) -> dict[str, tuple[object, str]]:
    """token -> (its day in token_deliveries, that row's xmin), for tokens with a mark."""
    rows = await db.fetch(
        "SELECT t.token, d.delivered_on, d.xmin::text FROM device_tokens t"
        " JOIN token_deliveries d ON d.token_id = t.id WHERE t.token = ANY($1::text[])",
        tokens,
    )
    return {r[0]: (r[1], r[2]) for r in rows}


async def test_an_all_users_broadcast_with_a_platform_filter(
    settings: Settings, empty_database_url: str, emulators: Emulators
) -> None:
    """ "all" on a database of its own, so no other test's tokens join the audience."""
    await migrate(empty_database_url)
    base = settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"url": SecretStr(empty_database_url)})
        }
    )
    wsettings = with_worker(await own_topics(emulators.apply(base)), page_size=100)
    pool = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=4)
    assert pool is not None
    try:
        users = [f"a-{i:05d}" for i in range(1_234)]
        ios = [(u, "ios", apns_token("all", i)) for i, u in enumerate(users) if i % 2]
        await add_tokens(pool, [(u, "android", fcm_token("all", i)) for i, u in enumerate(users)])
        await add_tokens(pool, ios)
        job = make_job({"kind": "all"}, platforms=["ios"])
        async with running_worker(wsettings):
            await publish(wsettings, job)
            done = await wait_for_job(pool, job.job_id)
    finally:
        await pool.close()
    assert deliveries(emulators) == {token: 1 for _, _, token in ios}
    # 617 iPhone users, shards of 5 pages of 100: 2 shards, the last one open above.
    assert (done.audience_users, done.shards_total, done.sent) == (617, 2, 617)


async def test_a_30_second_fcm_outage_mid_broadcast_loses_nothing(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    users = [f"o{t}-{i:05d}" for i in range(6_000)]
    android = {fcm_token(t, i) for i in range(len(users))}
    ios = {apns_token(t, i) for i in range(0, len(users), 2)}
    await add_tokens(db, [(u, "android", fcm_token(t, i)) for i, u in enumerate(users)])
    await add_tokens(db, [(u, "ios", apns_token(t, i)) for i, u in enumerate(users) if i % 2 == 0])
    await add_segment(db, f"seg-{t}", users)
    # A slow FCM, so the outage starts with most of the broadcast still to send.
    emulators.fcm.script.configure({"latency_ms": 40})
    quick = wsettings.retry.model_copy(
        update={"max_attempts": 3, "base_delay_s": 0.05, "max_delay_s": 0.5}
    )
    fast = with_worker(
        wsettings.model_copy(update={"retry": quick}),
        page_size=200,
        park_delay_s=4.0,
        park_max_delay_s=8.0,
    )
    fast = fast.model_copy(update={"fcm": fast.fcm.model_copy(update={"concurrency": 50})})
    job = make_job({"kind": "segment", "segment": f"seg-{t}"}, type="news")
    metrics = Metrics()

    def paused(service: str) -> float | None:
        labels = {"service": service}
        return metrics.registry.get_sample_value("pushfan_worker_platform_paused", labels)

    async with running_worker(fast, metrics):
        await publish(fast, job)
        await eventually(lambda: len(emulators.fcm.script.delivered) >= 1_000)
        assert (paused("fcm"), paused("apns")) == (0, 0)
        emulators.fcm.script.start_outage(30, "UNAVAILABLE")
        before = len(emulators.fcm.script.delivered)
        # Every shard finishes during the outage: FCM's tokens are parked, APNs goes on.
        during = await wait_for_job(db, job.job_id, within=25)
        assert emulators.fcm.script.current_outage() is not None
        # FCM's sends are paused (between probes), never APNs'.
        await eventually(lambda: paused("fcm") == 1, within=10)
        assert paused("apns") == 0
        assert set(emulators.apns.script.delivered) == ios
        assert during.retrying > 0
        assert before < len(android)

        async def settled() -> job_status.JobStatus | None:
            found = await job_status.status(db, job.job_id)
            return found if found is not None and found.retrying == 0 else None

        done = await eventually(settled, within=90)
        assert isinstance(done, job_status.JobStatus)

    got = deliveries(emulators)
    assert set(got) == android | ios
    assert set(got.values()) == {1}
    assert (done.sent, done.failed, done.retrying) == (len(android) + len(ios), 0, 0)
