"""The benchmark's phases: the senders' rate and the CPU-bound one- and two-worker
broadcasts on the audience, the latency-bound pair on part of it, then the optional
1,000,000-user broadcast."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.fanout.broadcast import Broadcast, Server, broadcast, phase_settings
from bench.fanout.cpus import Placement, cpu_name
from bench.fanout.emulators import Baseline, lean_rate, reset_emulators
from bench.fanout.jobs import news_job
from bench.fanout.report import print_senders, report
from bench.fanout.seed import seed, subsegment
from bench.nghttpd import canned_docroot, docroot_parent, start_nghttpd
from bench.senders import EmulatorProcess
from pushfan.emulators.runner import DEFAULT_APNS_TOPIC
from pushfan.settings import Settings
from worker.main import settle_gc
from worker.render import fcm_bodies, render_apns, render_fcm
from worker.senders.apns import APNS_PATH

BIG_USERS = 1_000_000
RSS_TARGET_MB = 200
CORE_TARGET = 50_000  # issue #9: tokens/s end to end on one worker core
ONE_CORE_PLATFORMS = (("FCM", "android"), ("APNs", "ios"))  # issue #9: each platform
_TOKENS_SQL = "SELECT token FROM device_tokens WHERE platform = $1"
SPEEDUP_TARGET = 1.7  # issue #5: two workers finish a broadcast 1.7 times as fast as one


@dataclass(frozen=True)
class LatencyBound:
    """The latency-bound comparison: every emulator response held ``ms``, each worker's
    senders keeping at most ``in_flight`` requests in flight per platform, on the first
    ``users`` users of the audience."""

    ms: int
    in_flight: int
    users: int

    @property
    def ceiling(self) -> float:
        """Tokens/s one worker can reach: ``in_flight`` requests per ``ms`` on each of the
        two platforms at once (the audience is half Android, half iOS)."""
        return 2 * self.in_flight * 1000 / self.ms


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
        # The senders' rate with the collector set as a worker sets it, so the ratio
        # compares the pipeline, not two garbage-collector settings.
        settle_gc()
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
        f"fanout CPU-bound: 2 workers / 1 worker {two.rate / one.rate:.2f}x on"
        f" {len(where.everywhere)} cores"
        " shared by the workers, the emulators, PostgreSQL and the broker: what this machine"
        " allows, not how the worker scales"
    )
    return one, base


async def latency_bound(
    settings: Settings,
    url: str,
    em: EmulatorProcess,
    lat: LatencyBound,
    where: Placement,
    logdir: Path,
) -> None:
    """One worker, then two in one group, on a segment of the first ``lat.users`` users
    (:func:`broadcasts` must have seeded them), every emulator response held ``lat.ms``:
    a worker's rate is then its requests in flight over the latency, as against FCM and
    APNs, and the pair should finish in about half the time while the machine has CPU to
    spare (the busy shares printed say whether it had). Printed."""
    script = {"latency_ms": lat.ms}
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        segment = f"bench-latency-{uuid.uuid4().hex[:6]}"
        tokens = sum((await subsegment(conn, lat.users, segment)).values())
        runs: list[Broadcast] = []
        for label, tag, cpus in (
            ("1 worker", "lat-one", [where.worker]),
            ("2 workers", "lat-two", list(where.pair)),
        ):
            runs.append(
                await broadcast(
                    f"{label}, {lat.ms} ms",
                    phase_settings(settings, url, em, tag, in_flight=lat.in_flight),
                    conn,
                    em,
                    segment,
                    lat.users,
                    tokens,
                    cpus,
                    logdir,
                    script=script,
                )
            )
    finally:
        # broadcast() resets the emulators when it ends normally; a failure must not
        # leave the latency to the phases after this one either.
        await reset_emulators(em)
        await conn.close()
    one, two = runs
    report(one, None)
    report(two, None, one)
    speedup = two.rate / one.rate
    exact = not (one.problems() or two.problems())
    # Shards are what the pair shares: an audience of one shard leaves a worker idle.
    shared = "/".join(f"{w.pages:,.0f}" for w in two.workers)
    print(
        f"fanout latency-bound ({lat.ms} ms per request, {lat.in_flight} in flight per platform"
        f" per worker): 2 workers / 1 worker {speedup:.2f}x (target {SPEEDUP_TARGET}x,"
        f" {'met' if speedup >= SPEEDUP_TARGET else 'NOT MET'}); 1 worker {one.rate:,.0f}"
        f" tokens/s, 2 workers {two.rate:,.0f} tokens/s (one worker's ceiling"
        f" {lat.ceiling:,.0f}); workers' cores {one.worker_cores:.2f} and"
        f" {two.worker_cores:.2f}, busy {one.cores.busy()} and {two.cores.busy()};"
        f" {two.status.shards_total or 0} shards, the pair's pages {shared};"
        f" {'every token delivered exactly once' if exact else 'NOT EXACT, see above'};"
        f" the phase took {time.perf_counter() - started:.0f} s"
    )


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


async def one_core(
    settings: Settings,
    url: str,
    em: EmulatorProcess,
    users: int,
    where: Placement,
    logdir: Path,
    implementations: tuple[str, ...] = ("lean", "h2"),
) -> None:
    """Issue #9's figure: one worker alone on its core against ``nghttpd`` (a C server
    answering every send with a canned 200, on the other core with PostgreSQL and the
    broker), on the first ``users`` users (:func:`broadcasts` must have seeded them). One
    broadcast per platform (an FCM-only job, then an APNs-only one: a token per user
    each) and per senders' ``implementation`` (the lean client, then the ``h2``-library
    reference), all in the same run. nghttpd keeps no log: the ledger's counts are the
    check. Printed: each run, then per platform the end-to-end rate against the target,
    the steady pace, the worker's CPU a token and the ratios."""
    conn = await asyncpg.connect(url)
    root = Path(tempfile.mkdtemp(prefix="pushfan-bench-nghttpd-", dir=docroot_parent()))
    runs: dict[tuple[str, str], Broadcast] = {}
    try:
        segment = f"bench-core-{uuid.uuid4().hex[:6]}"
        mix = await subsegment(conn, users, segment)
        ios = [r[0] for r in await conn.fetch(_TOKENS_SQL, "ios")]
        creds = em.credentials
        canned_docroot(root, fcm_project=creds.fcm_project_id, apns_tokens=ios)
        render_us = render_cost([r[0] for r in await conn.fetch(_TOKENS_SQL, "android")], ios)
        with start_nghttpd(creds, root, cpu=where.rest) as server:
            target = Server("nghttpd", server.pid, creds, server.url, server.url)
            for name, platform in ONE_CORE_PLATFORMS:
                for impl in implementations:
                    runs[name, impl] = await broadcast(
                        f"nghttpd, {name} {impl}",
                        phase_settings(
                            settings, url, target, f"core-{platform}-{impl}", implementation=impl
                        ),
                        conn,
                        target,
                        segment,
                        users,
                        mix[platform],
                        [where.worker],
                        logdir,
                        platforms=[platform],
                    )
    finally:
        await conn.close()
        shutil.rmtree(root, ignore_errors=True)
    for run in runs.values():
        report(run, None)
    for name, _ in ONE_CORE_PLATFORMS:
        lean = runs[name, implementations[0]]
        cpu_us = lean.worker_cores * lean.seconds / lean.tokens * 1e6
        steady = lean.progress.steady(lean.tokens)
        pace = f", {steady:,.0f} tokens/s from 10% to 90% of the users" if steady else ""
        ratios = "".join(
            f"; lean / {impl} {lean.rate / runs[name, impl].rate:.2f}x"
            for impl in implementations[1:]
        )
        print(
            f"fanout one core (issue #9), {name}: {lean.rate:,.0f} tokens/s end to end"
            f" (target {CORE_TARGET:,}: {'met' if lean.rate >= CORE_TARGET else 'NOT MET'})"
            f"{pace}; the worker alone on {cpu_name(where.worker)} at {cpu_us:.1f} us of"
            f" its CPU a token (one core would carry {1e6 / cpu_us:,.0f} tokens/s at that"
            f" cost); cpus busy {lean.cores.busy()}{ratios}"
        )
    print(
        "fanout one core: render, part of send: "
        + ", ".join(f"{name} {us:.2f} us a token" for name, us in render_us.items())
        + " (the job rendered once, each token spliced into its FCM body or APNs path;"
        " timed alone in this process)"
    )


def render_cost(android: list[str], ios: list[str]) -> dict[str, float]:
    """Rendering's share of a send, us a token: the job rendered once per platform, then
    each token put in its request as the senders do (the FCM body cut at its slot, the
    APNs path built)."""
    job = news_job({"kind": "segment", "segment": "bench"}, "bench-render")
    started = time.perf_counter()
    fcm_bodies(render_fcm(job), android)
    fcm = time.perf_counter() - started
    started = time.perf_counter()
    render_apns(job, topic=DEFAULT_APNS_TOPIC)
    [APNS_PATH + t for t in ios]
    apns = time.perf_counter() - started
    return {"FCM": fcm / max(len(android), 1) * 1e6, "APNs": apns / max(len(ios), 1) * 1e6}
