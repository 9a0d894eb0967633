"""Audience pages and shards on the real database: keyset order, bounds, exact splits."""

from __future__ import annotations

import uuid

import asyncpg

from tests.worker_harness import add_segment, add_tokens, fcm_token, make_job
from worker.audience import Shard, pages, shard_job, split


async def _segment(db: asyncpg.Pool, n: int) -> tuple[str, list[str]]:
    t = uuid.uuid4().hex[:8]
    users = [f"p{t}-{i:04d}" for i in range(n)]
    await add_segment(db, f"seg-{t}", users)
    return f"seg-{t}", users


async def test_shards_cover_the_audience_once_and_the_last_is_open(db: asyncpg.Pool) -> None:
    segment, users = await _segment(db, 1_000)  # an exact multiple of the shard size
    job = make_job({"kind": "segment", "segment": segment})
    shards = await split(db, job, 250)
    assert [s.users for s in shards] == [250, 250, 250, 250]
    assert shards[0].after is None
    assert shards[-1].until is None
    seen: list[str] = []
    for shard in shards:
        async for page in pages(db, job, after=shard.after, until=shard.until, page_size=100):
            seen.extend(page)
    assert seen == sorted(users)


async def test_pages_resume_after_a_cursor_and_stop_at_the_bound(db: asyncpg.Pool) -> None:
    segment, users = await _segment(db, 30)
    job = make_job({"kind": "segment", "segment": segment})
    ordered = sorted(users)
    got = [p async for p in pages(db, job, after=ordered[4], until=ordered[20], page_size=7)]
    assert got == [ordered[5:12], ordered[12:19], ordered[19:21]]


async def test_all_pages_users_with_an_active_token_of_the_platforms_asked(
    db: asyncpg.Pool,
) -> None:
    t = uuid.uuid4().hex[:8]
    await add_tokens(db, [(f"{t}-a", "android", fcm_token(t, 1)), (f"{t}-b", "ios", "b" * 64)])
    await add_tokens(db, [(f"{t}-c", "ios", "c" * 64)], active=False)
    job = make_job({"kind": "all"}, platforms=["ios"])
    found = [
        u async for p in pages(db, job, after=f"{t}-", until=f"{t}-z", page_size=10) for u in p
    ]
    assert found == [f"{t}-b"]


async def test_a_users_list_is_split_in_python_order_and_cut_per_shard(db: asyncpg.Pool) -> None:
    ids = [f"u{i}" for i in range(25)]
    job = make_job({"kind": "users", "user_ids": list(reversed(ids))})
    shards = await split(db, job, 10)
    ordered = sorted(ids)
    assert shards == [
        Shard(0, None, ordered[9], 10),
        Shard(1, ordered[9], ordered[19], 10),
        Shard(2, ordered[19], None, 5),
    ]
    middle = shard_job(job, shards[1])
    assert sorted(middle.audience.user_ids) == ordered[10:20]  # type: ignore[union-attr]
