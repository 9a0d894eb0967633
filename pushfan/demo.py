"""The demo ``pushfan up`` runs: real jobs through the real worker to the emulators.

1. "Order shipped" for user 42, who has two Android devices, an iPhone and a phone he
   logged out of: exactly the three active devices are notified.
2. A broadcast to a segment of demo users, with its progress as ``pushfan status``
   shows it, the rate, and what the emulators received.

Everything it writes is idempotent (registrations and seeding), so ``pushfan up`` can
run it again on the same database.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from pushfan.emulators.runner import Emulators
from pushfan.kafka import make_producer, start_client
from pushfan.settings import Settings
from registry import store
from schemas import NotificationJob
from worker import ledger
from worker import status as job_status
from worker.status import progress

DEMO_USER = "42"
SEGMENT = "demo-everyone"


def _job(audience: dict[str, object], kind: str, title: str, body: str) -> NotificationJob:
    now = datetime.now(UTC)
    return NotificationJob.model_validate(
        {
            "job_id": f"demo-{kind}-{uuid.uuid4().hex[:8]}",
            "type": kind,
            "audience": audience,
            "payload": {"title": title, "body": body, "data": {"demo": "true"}},
            "created_at": now,
            "expires_at": now + timedelta(hours=1),
        }
    )


def _fcm(tag: str) -> str:
    return f"demo{tag}:APA91b{'d' * 120}"


def _apns(tag: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_OID, tag).hex * 2


async def _devices_of_42(pool: asyncpg.Pool) -> dict[str, str]:
    """User 42's devices: two Android, one iPhone, and an old phone logged out."""
    devices = {
        "pixel": (_fcm("42-pixel"), "android"),
        "tablet": (_fcm("42-tablet"), "android"),
        "iphone": (_apns("42-iphone"), "ios"),
        "old-phone": (_fcm("42-old-phone"), "android"),
    }
    for device, (token, platform) in devices.items():
        reg = store.Registration(token, platform, f"demo-42-{device}", "demo-app")
        await store.register(pool, DEMO_USER, reg)
    await store.logout_token(pool, DEMO_USER, devices["old-phone"][0])
    return {device: token for device, (token, _) in devices.items()}


async def _seed_segment(pool: asyncpg.Pool, users: int) -> int:
    """``users`` demo users, each with an Android and an iPhone; returns the tokens."""
    ids = [f"demo-{i:07d}" for i in range(users)]
    await pool.execute(
        "INSERT INTO device_tokens (user_id, platform, token)"
        " SELECT u, p, t FROM unnest($1::text[], $2::text[], $3::text[]) AS x(u, p, t)"
        " ON CONFLICT (token) DO NOTHING",
        ids * 2,
        ["android"] * users + ["ios"] * users,
        [_fcm(u) for u in ids] + [_apns(u) for u in ids],
    )
    await pool.execute(
        "INSERT INTO segment_members (segment, user_id) SELECT $1, unnest($2::text[])"
        " ON CONFLICT DO NOTHING",
        SEGMENT,
        ids,
    )
    return 2 * users


async def _publish(settings: Settings, job: NotificationJob) -> None:
    producer = make_producer(settings.kafka)
    await start_client(producer, settings.kafka)
    try:
        await producer.send_and_wait(settings.kafka.topics.jobs, job.to_bytes(), key=b"demo")
    finally:
        await producer.stop()


async def _finished(
    pool: asyncpg.Pool, job_id: str, *, within: float, show: bool = False
) -> job_status.JobStatus:
    async with asyncio.timeout(within):
        shown = -1.0
        while True:
            found = await job_status.status(pool, job_id)
            if found is not None:
                share = progress(found)
                if show and share is not None and share - shown >= 0.1:
                    shown = share
                    bar = "#" * round(share * 30)
                    print(f"    [{bar:.<30}] {share:4.0%}  {found.sent:,} sent", flush=True)
                if found.state in ledger.FINAL_STATES and not found.retrying:
                    return found
            await asyncio.sleep(0.2)


async def run_demo(settings: Settings, emulators: Emulators, *, users: int) -> bool:
    """Both demos against a running worker; True if every device got what it should."""
    pool = await asyncpg.create_pool(
        settings.database.url.get_secret_value(), min_size=1, max_size=4
    )
    assert pool is not None
    try:
        return await _order_shipped(settings, emulators, pool) and await _broadcast(
            settings, emulators, pool, users
        )
    finally:
        await pool.close()


async def _order_shipped(settings: Settings, emulators: Emulators, pool: asyncpg.Pool) -> bool:
    tokens = await _devices_of_42(pool)
    job = _job(
        {"kind": "user", "user_id": DEMO_USER},
        "order_shipped",
        "Your order has shipped",
        "Order 123 is on its way.",
    )
    started = time.perf_counter()
    await _publish(settings, job)
    done = await _finished(pool, job.job_id, within=60)
    elapsed = (time.perf_counter() - started) * 1000
    got = {**emulators.fcm.script.delivered, **emulators.apns.script.delivered}
    reached = sorted(device for device, token in tokens.items() if got.get(token))
    ok = reached == ["iphone", "pixel", "tablet"] and done.sent == 3
    print(
        f"  demo 1: order shipped for user {DEMO_USER}: job {job.job_id} {done.state} in"
        f" {elapsed:.0f} ms, sent to {done.sent} devices ({', '.join(reached)});"
        f" the logged-out old phone got {'nothing' if 'old-phone' not in reached else 'IT TOO'}",
        flush=True,
    )
    return ok


async def _broadcast(
    settings: Settings, emulators: Emulators, pool: asyncpg.Pool, users: int
) -> bool:
    tokens = await _seed_segment(pool, users)
    before = emulators.fcm.script.snapshot()["total"] + emulators.apns.script.snapshot()["total"]
    job = _job({"kind": "segment", "segment": SEGMENT}, "news", "Spring sale", "20% off today.")
    print(
        f"  demo 2: broadcast {job.job_id} to segment {SEGMENT} ({users:,} users,"
        f" {tokens:,} tokens)",
        flush=True,
    )
    started = time.perf_counter()
    await _publish(settings, job)
    done = await _finished(pool, job.job_id, within=600, show=True)
    elapsed = time.perf_counter() - started
    after = emulators.fcm.script.snapshot()["total"] + emulators.apns.script.snapshot()["total"]
    print(
        f"    {done.state} in {elapsed:.1f} s: {done.sent:,} sent ({done.sent / elapsed:,.0f}"
        f" tokens/s), {done.shards_total} shards; the emulators received {after - before:,}",
        flush=True,
    )
    return done.sent == tokens and after - before == tokens
