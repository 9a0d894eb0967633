"""The delivery policy end to end: preferences, quiet hours that defer, the frequency cap.

Real broker, database and emulators; the workers' clock is a :class:`FakeClock` the
tests move (what the policy and job expiry take as now), so a night in Tokyo or a DST
night in New York happens in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, time, timedelta

import asyncpg
import pytest

from pushfan.emulators.runner import Emulators
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from schemas import NotificationJob
from tests.worker_harness import (
    FakeClock,
    add_segment,
    add_tokens,
    apns_token,
    deliveries,
    eventually,
    fcm_token,
    make_job,
    own_topics,
    publish,
    running_worker,
    tag,
    wait_for_job,
    with_worker,
)
from worker import status as job_status

# 23:00 in Tokyo (quiet), 09:00 in New York (not).
EVENING_IN_TOKYO = datetime(2026, 11, 23, 14, tzinfo=UTC)
TOKYO_MORNING = datetime(2026, 11, 23, 22, tzinfo=UTC)  # 07:00 in Tokyo
NIGHT = (time(22), time(7))


@pytest.fixture(autouse=True)
def fresh_scripts(emulators: Emulators) -> None:
    emulators.fcm.script.reset()
    emulators.apns.script.reset()


@pytest.fixture
async def wsettings(
    settings: Settings, migrated: str, emulators: Emulators, db: asyncpg.Pool
) -> AsyncIterator[Settings]:
    """One test's workers: own topics and group, the emulators, a fast release round.
    Deferrals left behind would be released by later tests' workers: cleared after."""
    out = await own_topics(emulators.apply(settings))
    yield with_worker(out, release_interval_s=0.1)
    await db.execute("DELETE FROM deferred_notifications")


async def quiet_hours(db: asyncpg.Pool, user: str, zone: str, window: tuple[time, time]) -> None:
    await db.execute(
        "INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end)"
        " VALUES ($1, $2, $3, $4)",
        user,
        zone,
        *window,
    )


async def opt_out(db: asyncpg.Pool, user: str, notification_type: str) -> None:
    await db.execute(
        "INSERT INTO notification_preferences (user_id, notification_type, push_enabled)"
        " VALUES ($1, $2, false)",
        user,
        notification_type,
    )


def news(clock: FakeClock, audience: Mapping[str, object], **fields: object) -> NotificationJob:
    """A ``news`` job created now by ``clock``, expiring 12 hours later unless told."""
    spec: dict[str, object] = {
        "type": "news",
        "created_at": clock() - timedelta(seconds=1),
        "expires_at": clock() + timedelta(hours=12),
    }
    return make_job(dict(audience), **{**spec, **fields})


async def released(db: asyncpg.Pool, job_id: str) -> job_status.JobStatus | None:
    found = await job_status.status(db, job_id)
    return found if found is not None and found.waiting == 0 else None


async def test_tokyo_waits_for_its_morning_while_new_york_gets_it_at_once(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    tokyo, new_york, opted_out = f"tokyo-{t}", f"ny-{t}", f"out-{t}"
    tokyo_phone, tokyo_ipad = fcm_token(t, 1), apns_token(t, 2)
    ny_phone, out_phone = fcm_token(t, 3), fcm_token(t, 4)
    await add_tokens(
        db,
        [
            (tokyo, "android", tokyo_phone),
            (tokyo, "ios", tokyo_ipad),
            (new_york, "android", ny_phone),
            (opted_out, "android", out_phone),
        ],
    )
    await quiet_hours(db, tokyo, "Asia/Tokyo", NIGHT)
    await quiet_hours(db, new_york, "America/New_York", NIGHT)
    await opt_out(db, opted_out, "news")
    await opt_out(db, new_york, "marketing")  # another type: news still goes
    await add_segment(db, f"seg-{t}", [tokyo, new_york, opted_out])
    clock = FakeClock(EVENING_IN_TOKYO)
    job = news(clock, {"kind": "segment", "segment": f"seg-{t}"})
    metrics = Metrics()

    async with running_worker(wsettings, metrics, clock):
        await publish(wsettings, job)
        done = await wait_for_job(db, job.job_id)
        assert deliveries(emulators) == {ny_phone: 1}
        assert (done.targeted, done.sent, done.suppressed, done.deferred) == (4, 1, 1, 2)
        assert (done.waiting, done.released) == (1, 0)

        clock.set(TOKYO_MORNING - timedelta(seconds=1))
        await asyncio.sleep(1)  # ten release rounds: still quiet in Tokyo
        assert deliveries(emulators) == {ny_phone: 1}

        clock.set(TOKYO_MORNING)
        after = await eventually(lambda: released(db, job.job_id))

    assert deliveries(emulators) == {ny_phone: 1, tokyo_phone: 1, tokyo_ipad: 1}
    assert isinstance(after, job_status.JobStatus)
    assert (after.sent, after.deferred, after.released, after.suppressed) == (3, 2, 2, 1)
    policy = {
        (p, d): metrics.registry.get_sample_value(
            "pushfan_worker_policy_tokens_total", {"platform": p, "decision": d}
        )
        for p in ("android", "ios")
        for d in ("suppressed", "deferred", "released")
    }
    assert policy == {
        ("android", "suppressed"): 1,
        ("android", "deferred"): 1,
        ("android", "released"): 1,
        ("ios", "suppressed"): None,
        ("ios", "deferred"): 1,
        ("ios", "released"): 1,
    }


async def test_urgent_bypasses_quiet_hours_and_opt_outs(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    sleeper, opted_out = f"tokyo-{t}", f"out-{t}"
    a, b = fcm_token(t, 1), apns_token(t, 2)
    await add_tokens(db, [(sleeper, "android", a), (opted_out, "ios", b)])
    await quiet_hours(db, sleeper, "Asia/Tokyo", NIGHT)
    await opt_out(db, opted_out, "news")
    await add_segment(db, f"seg-{t}", [sleeper, opted_out])
    clock = FakeClock(EVENING_IN_TOKYO)
    job = news(clock, {"kind": "segment", "segment": f"seg-{t}"}, priority="urgent")

    async with running_worker(wsettings, clock=clock):
        await publish(wsettings, job)
        done = await wait_for_job(db, job.job_id)

    assert deliveries(emulators) == {a: 1, b: 1}
    assert (done.sent, done.deferred, done.suppressed, done.waiting) == (2, 0, 0, 0)


async def test_a_dst_night_in_new_york_releases_at_7_summer_time(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    user, phone = f"ny-{t}", fcm_token(t, 1)
    await add_tokens(db, [(user, "android", phone)])
    await quiet_hours(db, user, "America/New_York", NIGHT)
    # 23:00 EST on 7 March 2026; at 02:00 the clocks jump to 03:00 EDT.
    clock = FakeClock(datetime(2026, 3, 8, 4, tzinfo=UTC))
    job = news(clock, {"kind": "user", "user_id": user})
    summer_seven = datetime(2026, 3, 8, 11, tzinfo=UTC)  # 07:00 EDT; 12:00 UTC in EST

    async with running_worker(wsettings, clock=clock):
        await publish(wsettings, job)
        await wait_for_job(db, job.job_id)
        release_at = await db.fetchval(
            "SELECT release_at FROM deferred_notifications WHERE job_id = $1", job.job_id
        )
        assert release_at == summer_seven

        clock.set(summer_seven - timedelta(seconds=1))
        await asyncio.sleep(1)
        assert deliveries(emulators) == {}
        clock.set(summer_seven)
        await eventually(lambda: released(db, job.job_id))

    assert deliveries(emulators) == {phone: 1}


async def test_a_deferral_whose_job_expires_first_is_not_sent(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    user, phone, ipad = f"tokyo-{t}", fcm_token(t, 1), apns_token(t, 2)
    await add_tokens(db, [(user, "android", phone), (user, "ios", ipad)])
    await quiet_hours(db, user, "Asia/Tokyo", NIGHT)
    clock = FakeClock(EVENING_IN_TOKYO)
    job = news(clock, {"kind": "user", "user_id": user}, expires_at=clock() + timedelta(hours=2))
    metrics = Metrics()

    async with running_worker(wsettings, metrics, clock):
        await publish(wsettings, job)
        done = await wait_for_job(db, job.job_id)
        assert (done.deferred, done.waiting) == (2, 1)
        clock.set(TOKYO_MORNING)  # the job expired at 16:00 UTC
        after = await eventually(lambda: released(db, job.job_id))

    assert deliveries(emulators) == {}
    assert isinstance(after, job_status.JobStatus)
    assert (after.sent, after.released, after.expired) == (0, 0, 2)
    expired = {"platform": "unknown", "decision": "expired"}
    assert metrics.registry.get_sample_value("pushfan_worker_policy_tokens_total", expired) == 2


async def test_two_workers_release_each_deferred_notification_once(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    users = [f"tokyo-{t}-{i:04d}" for i in range(400)]
    tokens = [fcm_token(t, i) for i in range(400)]
    await add_tokens(db, [(u, "android", tok) for u, tok in zip(users, tokens, strict=True)])
    await db.executemany(
        "INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end)"
        " VALUES ($1, 'Asia/Tokyo', '22:00', '07:00')",
        [(u,) for u in users],
    )
    await add_segment(db, f"seg-{t}", users)
    clock = FakeClock(EVENING_IN_TOKYO)
    job = news(clock, {"kind": "segment", "segment": f"seg-{t}"})
    # Pages of 40: the broadcast is split between the workers, and so are the releases.
    small = with_worker(wsettings, page_size=40, shard_pages=2)
    one, two = Metrics(), Metrics()

    async with running_worker(small, one, clock), running_worker(small, two, clock):
        await publish(small, job)
        done = await wait_for_job(db, job.job_id)
        assert (done.deferred, done.waiting, deliveries(emulators)) == (400, 400, {})
        clock.set(TOKYO_MORNING)
        after = await eventually(lambda: released(db, job.job_id))

    assert deliveries(emulators) == dict.fromkeys(tokens, 1)
    assert isinstance(after, job_status.JobStatus)
    assert (after.sent, after.released) == (400, 400)
    by_worker = [
        m.registry.get_sample_value(
            "pushfan_worker_policy_tokens_total", {"platform": "android", "decision": "released"}
        )
        or 0
        for m in (one, two)
    ]
    assert sum(by_worker) == 400


async def test_the_frequency_cap_holds_back_low_priority_only(
    wsettings: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    t = tag()
    user, phone = f"u-{t}", fcm_token(t, 1)
    await add_tokens(db, [(user, "android", phone)])
    clock = FakeClock(EVENING_IN_TOKYO)
    capped = with_worker(wsettings, low_cap=2, low_cap_window_s=3600)
    audience = {"kind": "user", "user_id": user}
    lows = [news(clock, audience, priority="low") for _ in range(3)]
    normal = news(clock, audience)

    async with running_worker(capped, clock=clock):
        for job in lows:  # one after another: each counts before the next is decided
            await publish(capped, job)
            await wait_for_job(db, job.job_id)
        await publish(capped, normal)
        await wait_for_job(db, normal.job_id)
        clock.set(clock() + timedelta(hours=1, seconds=1))  # the window has moved on
        late = news(clock, audience, priority="low")
        await publish(capped, late)
        await wait_for_job(db, late.job_id)

    counts = [await job_status.status(db, j.job_id) for j in (*lows, normal, late)]
    assert [(c.sent, c.capped) for c in counts if c is not None] == [
        (1, 0),
        (1, 0),
        (0, 1),
        (1, 0),
        (1, 0),
    ]
    assert deliveries(emulators) == {phone: 4}
