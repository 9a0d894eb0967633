"""The fanout worker end to end: real broker, real PostgreSQL, the FCM and APNs emulators."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pushfan.emulators.runner import Emulators, start_emulators
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from registry import store
from tests.worker_harness import (
    add_segment,
    add_tokens,
    apns_token,
    deliveries,
    fcm_token,
    make_job,
    own_topics,
    publish,
    running_worker,
    wait_for_job,
)


@pytest.fixture(scope="module")
async def emulators(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Emulators]:
    running = await start_emulators(tmp_path_factory.mktemp("emulators"))
    yield running
    await running.stop()


@pytest.fixture(autouse=True)
def fresh_scripts(emulators: Emulators) -> None:
    emulators.fcm.script.reset()
    emulators.apns.script.reset()


@pytest.fixture
async def wsettings(settings: Settings, migrated: str, emulators: Emulators) -> Settings:
    """Settings for one test's workers: its own topics and group, the emulators."""
    return await own_topics(emulators.apply(settings))


def tag() -> str:
    return uuid.uuid4().hex[:8]


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
        done = await wait_for_job(db, job.job_id, timeout=120)

    got = deliveries(emulators)
    assert done.state == "completed"
    assert len(got) == len(rows)
    assert set(got) == {token for _, _, token in rows}
    assert set(got.values()) == {1}
    assert (done.audience_users, done.users_done, done.sent) == (25_000, 25_000, len(rows))
    assert done.shards_done == done.shards_total == 5
    # Both workers sent a share of the shards.
    shares = [
        m.registry.get_sample_value("pushfan_worker_users_done_total") or 0 for m in (first, second)
    ]
    assert sum(shares) == 25_000 and min(shares) > 0, shares
