"""The benchmark's phases: the senders' rate and the one- and two-worker broadcasts on
the audience, then the optional 1,000,000-user broadcast."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import asyncpg

from bench.fanout.broadcast import Broadcast, broadcast, phase_settings
from bench.fanout.cpus import Placement
from bench.fanout.emulators import Baseline, lean_rate
from bench.fanout.report import print_senders, report
from bench.fanout.seed import seed
from bench.senders import EmulatorProcess
from pushfan.settings import Settings

BIG_USERS = 1_000_000
RSS_TARGET_MB = 200


async def broadcasts(
    settings: Settings,
    url: str,
    em: EmulatorProcess,
    users: int,
    sends: int,
    where: Placement,
    logdir: Path,
) -> tuple[Broadcast, Baseline]:
    """The senders' rate, then one worker and two on ``users`` users; printed."""
    conn = await asyncpg.connect(url)
    try:
        segment = f"bench-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        mix = await seed(conn, users, segment)
        tokens = sum(mix.values())
        print(
            f"fanout: {users:,} users, {tokens:,} tokens ({mix['android']:,} android +"
            f" {mix['ios']:,} ios) in segment {segment}, COPY + VACUUM in"
            f" {time.perf_counter() - t0:.1f} s; pages of {settings.worker.page_size},"
            f" shards of {settings.worker.shard_pages} pages,"
            f" {settings.kafka.topic_partitions} partitions; {where.describe()}"
        )
        n_fcm = round(2 * sends * mix["android"] / tokens)
        alone = [
            await lean_rate(em, sends, 0, where.worker),
            await lean_rate(em, 0, sends, where.worker),
        ]
        base = Baseline([await lean_rate(em, n_fcm, 2 * sends - n_fcm, where.worker)])
        one = await broadcast(
            "1 worker",
            phase_settings(settings, url, em, "one"),
            conn,
            em,
            segment,
            users,
            tokens,
            [where.worker],
            logdir,
        )
        two = await broadcast(
            "2 workers",
            phase_settings(settings, url, em, "two"),
            conn,
            em,
            segment,
            users,
            tokens,
            list(where.pair),
            logdir,
        )
        base.runs.append(await lean_rate(em, n_fcm, 2 * sends - n_fcm, where.worker))
    finally:
        await conn.close()
    print_senders(alone, base, where)
    report(one, base)
    report(two, base, one)
    print(
        f"fanout: 2 workers / 1 worker {two.rate / one.rate:.2f}x on {len(where.everywhere)} cores"
        " shared by the workers, the emulators, PostgreSQL and the broker: what this machine"
        " allows, not how the worker scales"
    )
    return one, base


async def big_broadcast(
    settings: Settings,
    url: str,
    em: EmulatorProcess,
    where: Placement,
    logdir: Path,
    one: Broadcast,
    base: Baseline,
) -> None:
    """One worker, :data:`BIG_USERS` users: its peak RSS against the smaller broadcast's."""
    conn = await asyncpg.connect(url)
    try:
        segment = f"bench-big-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        mix = await seed(conn, BIG_USERS, segment)
        print(f"fanout big: {BIG_USERS:,} users seeded in {time.perf_counter() - t0:.1f} s")
        big = await broadcast(
            "1M users",
            phase_settings(settings, url, em, "big"),
            conn,
            em,
            segment,
            BIG_USERS,
            sum(mix.values()),
            [where.worker],
            logdir,
        )
    finally:
        await conn.close()
    report(big, base)
    peak = big.workers[0].peak_rss_kb / 1024
    print(
        f"fanout big: peak RSS {peak:,.0f} MB for {big.users:,} users against"
        f" {one.workers[0].peak_rss_kb / 1024:,.0f} MB for {one.users:,} (target: under"
        f" {RSS_TARGET_MB} MB, {'met' if peak < RSS_TARGET_MB else 'NOT MET'})"
    )
