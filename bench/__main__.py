"""``make bench``: rates and ratios, each against a baseline measured in the same run.

Runs on the same infrastructure as the tests (``KAFKA_BOOTSTRAP_SERVERS`` /
``DATABASE_URL``, else the embedded broker and PostgreSQL). Nothing here asserts a
time: it prints figures for people to compare across commits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from bench import nghttpd
from bench.cleanup import bench_cleanup
from bench.fanout import LatencyBound
from bench.fanout import run as bench_fanout
from bench.h2 import run as bench_h2
from bench.registry import run as bench_registry
from bench.senders import run as bench_senders
from pushfan.db import migrate
from pushfan.kafka import assign_all, make_consumer, make_producer, start_client
from pushfan.logs import configure_logging
from pushfan.settings import LoggingSettings, Settings, load_settings
from pushfan.stack import start_stack
from schemas import NotificationJob, decode_job
from worker.tokens import fetch_page_tokens, fetch_span_tokens

BARE_PAGE_SQL = """
SELECT id, user_id, platform, token FROM device_tokens
 WHERE user_id = ANY($1::text[]) AND is_active
"""


def _job(i: int) -> NotificationJob:
    now = datetime.now(UTC)
    return NotificationJob.model_validate(
        {
            "job_id": f"bench-{i}-{uuid.uuid4().hex[:8]}",
            "type": "order_shipped",
            "audience": {"kind": "user", "user_id": str(i)},
            "payload": {
                "title": "Your order has shipped",
                "body": f"Order {i} is on its way.",
                "data": {"order_id": str(i), "carrier": "DHL"},
                "apns": {"collapse_id": f"order-{i}", "sound": "default"},
                "android": {"channel_id": "orders", "ttl": 3600},
            },
            "created_at": now,
            "expires_at": now + timedelta(hours=1),
        }
    )


def _nghttpd_found() -> bool:
    if nghttpd.binary():
        return True
    print("fanout one core: skipped, nghttpd not found (Debian's nghttp2-server)")
    return False


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>12,.0f}/s"


def bench_decode(n: int) -> None:
    raw = [_job(i).to_bytes() for i in range(n)]
    t0 = time.perf_counter()
    for r in raw:
        json.loads(r)
    base = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in raw:
        decode_job(r)
    ours = time.perf_counter() - t0
    print(
        f"job decode+validate   {_rate(n, ours)}   json.loads baseline {_rate(n, base)}"
        f"   ratio {base / ours:.2f}"
    )


async def bench_broker(settings: Settings, n: int) -> None:
    topic = f"bench.jobs.{uuid.uuid4().hex[:8]}"
    payloads = [_job(i).to_bytes() for i in range(n)]
    producer = make_producer(settings.kafka)
    await start_client(producer, settings.kafka)
    try:
        t0 = time.perf_counter()
        futures = [
            await producer.send(topic, p, key=str(i).encode()) for i, p in enumerate(payloads)
        ]
        await asyncio.gather(*futures)
        produced = time.perf_counter() - t0
    finally:
        await producer.stop()
    consumer = make_consumer(settings.kafka, group_id=None)
    await start_client(consumer, settings.kafka)
    try:
        await assign_all(consumer, topic)
        seen = 0
        t0 = time.perf_counter()
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for records in batches.values():
                for rec in records:
                    assert rec.value is not None
                    decode_job(rec.value)
                    seen += 1
        consumed = time.perf_counter() - t0
    finally:
        await consumer.stop()
    avg = sum(map(len, payloads)) / n
    print(f"broker produce acks=all {_rate(n, produced)}   ({n:,} jobs of {avg:.0f} B)")
    print(f"broker consume+decode {_rate(n, consumed)}")


async def bench_page_query(url: str, users: int, page: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await _seed(conn, users)
        ids = [f"user-{i:08d}" for i in range(users)]
        pages = [ids[i : i + page] for i in range(0, users, page)]

        async def run(fetch: Callable[[list[str]], Awaitable[int]]) -> tuple[float, int]:
            t0 = time.perf_counter()
            tokens = 0
            for p in pages:
                tokens += await fetch(p)
            return time.perf_counter() - t0, tokens

        async def bare(p: list[str]) -> int:
            return len(await conn.fetch(BARE_PAGE_SQL, p))

        async def with_policy(p: list[str]) -> int:
            return len(await fetch_page_tokens(conn, p, "marketing"))

        below = {p[-1]: (pages[n - 1][-1] if n else "") for n, p in enumerate(pages)}

        async def by_range(p: list[str]) -> int:  # how an "all" audience's page is read
            return len(await fetch_span_tokens(conn, below[p[-1]], p[-1], "marketing"))

        await run(bare)  # warm the cache for all three
        base_s, base_n = await run(bare)
        ours_s, ours_n = await run(with_policy)
        span_s, span_n = await run(by_range)
        assert base_n == ours_n == span_n
        print(
            f"page query w/ policy  {_rate(ours_n, ours_s)} tokens   bare query "
            f"{_rate(base_n, base_s)}   ratio {base_s / ours_s:.2f}   "
            f"({users:,} users, {ours_n:,} tokens, pages of {page})"
        )
        print(
            f"page query by range   {_rate(span_n, span_s)} tokens   by name (above) "
            f'{_rate(ours_n, ours_s)}   ratio {ours_s / span_s:.2f}   (an "all" audience\'s'
            " pages: the users in (previous page's last, this page's last], one index range)"
        )
    finally:
        await conn.close()


async def _seed(conn: asyncpg.Connection, users: int) -> None:
    rnd = random.Random(7)
    await conn.execute("TRUNCATE device_tokens, user_preferences, notification_preferences")
    tokens = []
    quiet = []
    prefs = []
    for i in range(users):
        uid = f"user-{i:08d}"
        for d in range(2):
            platform = "ios" if rnd.random() < 0.45 else "android"
            tokens.append((f"{uid}-tok-{d}-{uuid.uuid4().hex}", uid, platform, f"{uid}-d{d}"))
        if rnd.random() < 0.3:
            quiet.append((uid, "Asia/Tokyo"))
        if rnd.random() < 0.1:
            prefs.append((uid, "marketing", False))
    await conn.copy_records_to_table(
        "device_tokens", records=tokens, columns=["token", "user_id", "platform", "device_id"]
    )
    await conn.executemany(
        "INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end)"
        " VALUES ($1, $2, '22:00', '07:00')",
        quiet,
    )
    await conn.copy_records_to_table(
        "notification_preferences",
        records=prefs,
        columns=["user_id", "notification_type", "push_enabled"],
    )
    await conn.execute("ANALYZE")


STAGES = ["decode", "broker", "page", "cleanup", "registry", "fanout", "senders", "h2"]
ON_THEIR_OWN = {"senders", "h2"}  # need neither the broker nor PostgreSQL


async def _main(settings: Settings, args: argparse.Namespace) -> None:
    url = settings.database.url.get_secret_value()
    await migrate(url)
    if "decode" in args.only:
        bench_decode(args.jobs)
    if "broker" in args.only:
        await bench_broker(settings, args.jobs)
    if "page" in args.only:
        await bench_page_query(url, args.users, settings.worker.page_size)
    if "cleanup" in args.only:
        await bench_cleanup(settings, args.dead)


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs to decode and publish")
    parser.add_argument("--users", type=int, default=100_000, help="users (2 tokens each)")
    parser.add_argument("--sends", type=int, default=20_000, help="tokens per lean sender")
    parser.add_argument(
        "--baseline-sends", type=int, default=2_000, help="tokens per SDK baseline sender"
    )
    parser.add_argument(
        "--h2-sends",
        type=int,
        default=50_000,
        help="h2: tokens per lean and h2-library sender (and h2load requests)",
    )
    parser.add_argument(
        "--h2-baseline-sends", type=int, default=3_000, help="h2: tokens per SDK sender"
    )
    parser.add_argument(
        "--dead", type=int, default=100_000, help="invalid-token events for the cleanup consumer"
    )
    parser.add_argument(
        "--registrations", type=int, default=8_000, help="registry API requests per phase"
    )
    parser.add_argument(
        "--big",
        action="store_true",
        help="fanout: also a 1,000,000-user broadcast, for the worker's peak RSS (slow)",
    )
    parser.add_argument(
        "--latency-ms",
        type=int,
        default=100,
        help="fanout: the latency-bound comparison's provider latency (0: skip that phase)",
    )
    parser.add_argument(
        "--latency-in-flight",
        type=int,
        default=100,
        help="fanout: requests in flight per platform per worker in the latency-bound phase",
    )
    parser.add_argument(
        "--latency-users",
        type=int,
        default=20_000,
        help="fanout: users in the latency-bound phase (at most --users; two shards or more,"
        " 10,000 users with the default pages and shards, or one worker of two idles)",
    )
    parser.add_argument(
        "--policy-users",
        type=int,
        default=60_000,
        help="fanout: users in the delivery policy's cost phase (at most --users; 0: skip it)",
    )
    parser.add_argument(
        "--core-users",
        type=int,
        default=100_000,
        help="fanout: users in the one-core phase against nghttpd, issue #9's figure: an"
        " FCM-only and an APNs-only broadcast to them (at most --users; 0: skip it)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=STAGES,
        default=STAGES,
        metavar="STAGE",
        help=f"run only these benchmarks, of: {' '.join(STAGES)}",
    )
    args = parser.parse_args()
    configure_logging(LoggingSettings(level="WARNING"))
    if set(args.only) - ON_THEIR_OWN:
        _with_stack(args)
    if "senders" in args.only:
        # They pin this process to one core and the emulators to the other.
        bench_senders(args.sends, args.baseline_sends)
    if "h2" in args.only:
        # nghttpd on one core, each client in a process of its own on the other.
        bench_h2(args.h2_sends, args.h2_baseline_sends)


def _with_stack(args: argparse.Namespace) -> None:
    settings = load_settings()
    stack = start_stack(settings, purpose="pushfan_bench")
    try:
        settings = stack.apply(settings)
        print(f"pushfan bench: broker {stack.broker.kind}, PostgreSQL {stack.database.kind}")
        asyncio.run(_main(settings, args))
        if "registry" in args.only:
            # Pins the registry API process to one core, this one (and an embedded
            # PostgreSQL) to the other.
            bench_registry(
                settings.database.url.get_secret_value(),
                args.registrations,
                pin_database=stack.database.kind == "embedded",
            )
        if "fanout" in args.only:
            # pushfan worker processes on the broker and a fresh database of the stack's
            # server; they and the emulators' process are pinned to cores of their own.
            latency = (
                LatencyBound(args.latency_ms, args.latency_in_flight, args.latency_users)
                if args.latency_ms > 0
                else None
            )
            bench_fanout(
                stack,
                settings,
                args.users,
                args.sends,
                big=args.big,
                latency=latency,
                policy_users=args.policy_users,
                core_users=args.core_users if _nghttpd_found() else 0,
            )
    finally:
        stack.close()


if __name__ == "__main__":
    main()
