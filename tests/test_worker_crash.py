"""``pushfan worker`` processes killed or stopped mid-broadcast, then started again."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid

import asyncpg
import pytest

from pushfan.emulators.runner import Emulators
from pushfan.settings import Settings, subprocess_env
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
    wait_for_job,
    with_worker,
)

PAGE_USERS = 100
PARTITIONS = 4


@pytest.fixture
async def slow(settings: Settings, migrated: str, emulators: Emulators) -> Settings:
    """Small pages and a slow FCM, so a broadcast of a few thousand users takes seconds."""
    emulators.fcm.script.reset()
    emulators.apns.script.reset()
    emulators.fcm.script.configure({"latency_ms": 20})
    out = with_worker(
        await own_topics(emulators.apply(settings), partitions=PARTITIONS),
        page_size=PAGE_USERS,
        drain_timeout_s=20.0,
    )
    return out.model_copy(update={"fcm": out.fcm.model_copy(update={"concurrency": 40})})


async def _broadcast(db: asyncpg.Pool, users: int) -> tuple[str, set[str]]:
    t = uuid.uuid4().hex[:8]
    ids = [f"k{t}-{i:05d}" for i in range(users)]
    rows = [(u, "android", fcm_token(t, i)) for i, u in enumerate(ids)]
    rows += [(u, "ios", apns_token(t, i)) for i, u in enumerate(ids)]
    await add_tokens(db, rows)
    await add_segment(db, f"seg-{t}", ids)
    return f"seg-{t}", {token for _, _, token in rows}


async def _worker(settings: Settings) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushfan.cli",
        "worker",
        env=subprocess_env(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def test_sigkill_mid_broadcast_then_restart_resends_at_most_the_pages_in_flight(
    slow: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    segment, tokens = await _broadcast(db, 6_000)
    job = make_job({"kind": "segment", "segment": segment}, type="news")
    first = await _worker(slow)
    try:
        await publish(slow, job)
        await eventually(lambda: len(deliveries(emulators)) >= 3_000, within=60)
    finally:
        first.kill()
        await first.wait()
    at_kill = len(deliveries(emulators))
    assert at_kill < len(tokens), "the broadcast finished before the kill; make it slower"

    second = await _worker(slow)
    try:
        done = await wait_for_job(db, job.job_id, within=120)
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 60) == 0

    got = deliveries(emulators)
    assert set(got) == tokens
    # One page in flight per shard being sent, and one shard at a time per partition.
    resent = sum(n - 1 for n in got.values())
    assert resent <= PARTITIONS * PAGE_USERS * 2, resent
    # A page that was not reported is counted once, when it is sent again.
    assert (done.state, done.sent, done.users_done) == ("completed", len(tokens), 6_000)


async def test_sigterm_mid_broadcast_then_restart_repeats_nothing(
    slow: Settings, db: asyncpg.Pool, emulators: Emulators
) -> None:
    segment, tokens = await _broadcast(db, 6_000)
    job = make_job({"kind": "segment", "segment": segment}, type="news")
    first = await _worker(slow)
    try:
        await publish(slow, job)
        await eventually(lambda: len(deliveries(emulators)) >= 3_000, within=60)
    finally:
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 60) == 0
    assert len(deliveries(emulators)) < len(tokens)

    second = await _worker(slow)
    try:
        done = await wait_for_job(db, job.job_id, within=120)
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 60) == 0

    got = deliveries(emulators)
    assert set(got) == tokens
    assert set(got.values()) == {1}
    assert (done.state, done.sent) == ("completed", len(tokens))
