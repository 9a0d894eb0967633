"""The demo ``pushfan up`` runs: business events and jobs through the running services.

1. **Order shipped.** User 42 registers four devices through the registry API and logs
   out of one. The fulfilment system emits an "order shipped" event on its own topic,
   twice (as at-least-once producers do); the bridge turns it into one job, the worker
   sends it once to each of the three active devices and skips the duplicate.
2. **Broadcast.** A segment of demo users (:mod:`pushfan.demo.seed`: both platforms,
   some asleep, some opted out, some with dead tokens) gets a broadcast; its progress
   shows while it runs, then :mod:`pushfan.demo.summary` accounts for every token.

:func:`run_demo` returns False, and says why, if anything came out other than it
should; ``pushfan up`` then exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import httpx

from producer import JobProducer, build_job
from producer.bridge import JOB_ID_FORMAT
from pushfan.demo import summary
from pushfan.demo.seed import SEGMENT, Population, apns_token, fcm_token, seed
from pushfan.emulators.runner import Emulators
from pushfan.kafka import make_producer, start_client
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from registry import store
from worker import ledger
from worker.status import BAR, JobStatus, progress, status

DEMO_USER = "42"
APP_ID = "com.example.shop"
BROADCAST_TYPE = "news"


@dataclass
class Demo:
    """The running system the demo drives."""

    settings: Settings
    emulators: Emulators
    pool: asyncpg.Pool
    registry_url: str
    worker_metrics: Metrics
    bearer: Callable[[str], str] | None  # a registry token for a user; None: cannot mint


async def run_demo(demo: Demo, *, users: int) -> bool:
    """Both parts; True if every device got what it should and nothing else."""
    return await order_shipped(demo) and await broadcast(demo, users)


# -- 1. order shipped -----------------------------------------------------------------


async def _register_devices_of_42(demo: Demo) -> dict[str, str]:
    """Two Android devices, an iPhone, and an old phone logged out; device -> token."""
    devices = {
        "pixel": (fcm_token("42-pixel"), "android"),
        "tablet": (fcm_token("42-tablet"), "android"),
        "iphone": (apns_token("42-iphone"), "ios"),
        "old-phone": (fcm_token("42-old-phone"), "android"),
    }
    old_phone = devices["old-phone"][0]
    if demo.bearer is None:  # RS256: only the issuer can mint tokens; write directly
        for device, (token, platform) in devices.items():
            reg = store.Registration(token, platform, f"42-{device}", APP_ID)
            await store.register(demo.pool, DEMO_USER, reg)
        await store.logout_token(demo.pool, DEMO_USER, old_phone)
    else:
        headers = {"authorization": f"Bearer {demo.bearer(DEMO_USER)}"}
        async with httpx.AsyncClient(base_url=demo.registry_url, headers=headers) as api:
            for device, (token, platform) in devices.items():
                body = {"token": token, "platform": platform, "device_id": f"42-{device}"}
                answer = await api.post("/v1/devices", json={**body, "app_id": APP_ID})
                answer.raise_for_status()
            answer = await api.post("/v1/devices/unregister", json={"token": old_phone})
            answer.raise_for_status()
    return {device: token for device, (token, _) in devices.items()}


async def _emit_order_event(settings: Settings, order_id: str, times: int) -> None:
    """The fulfilment system's event, written as its own producer would: plain JSON."""
    event = {
        "order_id": order_id,
        "user_id": DEMO_USER,
        "carrier": "DHL",
        "tracking_url": f"https://tracking.example.com/{order_id}",
        "shipped_at": datetime.now(UTC).isoformat(),
    }
    producer = make_producer(settings.kafka)
    await start_client(producer, settings.kafka)
    try:
        for _ in range(times):
            await producer.send_and_wait(
                settings.bridge.topic, json.dumps(event).encode(), key=order_id.encode()
            )
    finally:
        await producer.stop()


def _duplicates(metrics: Metrics) -> float:
    return (
        metrics.registry.get_sample_value("pushfan_worker_jobs_total", {"outcome": "duplicate"})
        or 0
    )


async def order_shipped(demo: Demo) -> bool:
    tokens = await _register_devices_of_42(demo)
    how = "the registry API" if demo.bearer else "the token store"
    print(f"  demo 1: user {DEMO_USER} registered 4 devices through {how}, logged out of one")
    order_id = f"D{uuid.uuid4().hex[:6].upper()}"
    job_id = JOB_ID_FORMAT.format(order_id=order_id)
    duplicates = _duplicates(demo.worker_metrics)
    started = time.perf_counter()
    await _emit_order_event(demo.settings, order_id, times=2)
    print(
        f"    order {order_id} shipped: the event arrived twice on {demo.settings.bridge.topic};"
        f" the bridge made job {job_id}"
    )
    done = await _finished(demo.pool, job_id, within=60)
    elapsed = (time.perf_counter() - started) * 1000
    async with asyncio.timeout(30):  # the second copy of the job: skipped, not sent
        while _duplicates(demo.worker_metrics) <= duplicates:  # noqa: ASYNC110 (a metric)
            await asyncio.sleep(0.05)
    got = {**demo.emulators.fcm.script.delivered, **demo.emulators.apns.script.delivered}
    reached = {device: got[token] for device, token in tokens.items() if got.get(token)}
    ok = reached == {"iphone": 1, "pixel": 1, "tablet": 1} and done.sent == 3
    print(
        f"    {done.state} in {elapsed:.0f} ms: sent to {done.sent} devices"
        f" ({', '.join(sorted(reached))}), once each; the duplicate was skipped;"
        f" the logged-out old phone got {'it too' if 'old-phone' in reached else 'nothing'}",
        flush=True,
    )
    if not ok:
        print(f"    expected one message on each of 3 devices, got {reached}", flush=True)
    return ok


# -- 2. broadcast ---------------------------------------------------------------------


async def broadcast(demo: Demo, users: int) -> bool:
    now = datetime.now(UTC)
    pop = await seed(demo.pool, users, BROADCAST_TYPE, now)
    e = demo.emulators
    e.fcm.script.configure({"dead_tokens": pop.dead.get("android", [])})
    e.apns.script.configure({"dead_tokens": pop.dead.get("ios", [])})
    job = build_job(
        {"kind": "segment", "segment": SEGMENT},
        type=BROADCAST_TYPE,
        title="Spring sale",
        body="20% off everything today.",
        data={"campaign": "spring"},
        job_id=f"demo-news-{uuid.uuid4().hex[:8]}",
        now=now,
    )
    dead = sum(len(d) for d in pop.dead.values())
    print(
        f"  demo 2: broadcast {job.job_id} to segment {SEGMENT}: {users:,} users,"
        f" {sum(pop.tokens.values()):,} tokens\n"
        f"    {pop.quiet_users:,} users are inside their quiet hours,"
        f" {pop.opted_out_users:,} turned {BROADCAST_TYPE} off,"
        f" {dead:,} tokens will be reported dead",
        flush=True,
    )
    before = summary.read(demo.worker_metrics.registry, e)
    started = time.perf_counter()
    async with JobProducer(demo.settings.kafka) as producer:
        await producer.publish(job)
    done = await _finished(demo.pool, job.job_id, within=600, show=True)
    elapsed = time.perf_counter() - started
    counted = summary.read(demo.worker_metrics.registry, e) - before
    cleaned = await _cleaned(demo.pool, pop, counted.invalid)
    print(
        f"    {done.state} in {elapsed:.1f} s ({sum(counted.delivered.values()) / elapsed:,.0f}"
        f" tokens/s), {done.shards_total or 1} shard(s); follow any job with"
        f" `pushfan status {job.job_id}`\n",
        flush=True,
    )
    account = summary.Summary(Counter(done.targeted_by_platform), counted, cleaned)
    print(account.table(), flush=True)
    wrong = account.mismatches(pop)
    for line in wrong:
        print(f"    MISMATCH {line}", flush=True)
    if not wrong:
        print(
            f"    every token accounted for; the {pop.quiet_users:,} sleeping users get it when"
            " their quiet hours end (while this keeps running), none is dropped",
            flush=True,
        )
    return not wrong


async def _cleaned(pool: asyncpg.Pool, pop: Population, invalid: Counter[str]) -> Counter[str]:
    """Dead tokens deactivated by the cleanup consumer, per platform, once it has caught
    up with ``invalid`` (or after 30 s, whatever it has done by then)."""
    dead = [t for tokens in pop.dead.values() for t in tokens]
    found: Counter[str] = Counter()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = await pool.fetch(
            "SELECT platform, count(*) AS n FROM device_tokens"
            " WHERE token = ANY($1::text[]) AND NOT is_active GROUP BY platform",
            dead,
        )
        found = Counter({r["platform"]: r["n"] for r in rows})
        if found >= invalid:
            break
        await asyncio.sleep(0.1)
    return found


async def _finished(
    pool: asyncpg.Pool, job_id: str, *, within: float, show: bool = False
) -> JobStatus:
    """The job's status once it is final with no retries pending; with ``show``, a
    progress bar meanwhile (redrawn in place on a terminal, every 10% otherwise)."""
    tty = show and sys.stdout.isatty()
    shown = -1.0
    async with asyncio.timeout(within):
        while True:
            found = await status(pool, job_id)
            final = found is not None and found.state in ledger.FINAL_STATES
            share = progress(found) if show and found is not None else None
            if found is not None and share is not None and (tty or share - shown >= 0.1 or final):
                shown = share
                bar = "#" * round(share * BAR)
                users = f"{found.users_done:,}" + (
                    f" / {found.audience_users:,}" if found.audience_users else ""
                )
                line = f"    [{bar:.<{BAR}}] {share:4.0%}  {users} users, {found.sent:,} sent"
                print(f"\r{line}" if tty else line, end="" if tty else "\n", flush=True)
            if found is not None and final and not found.retrying:
                if tty:
                    print(flush=True)
                return found
            await asyncio.sleep(0.1 if tty else 0.2)
