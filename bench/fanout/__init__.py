"""End to end: one broadcast through ``pushfan worker`` processes (issue #5's "Speed and
memory").

A fresh database on the bench's PostgreSQL gets ``users`` users with two active tokens
each (one Android, one iOS) and a segment holding all of them, bulk-loaded with COPY. The
FCM and APNs emulators run in a process of their own (``pushfan emulators``), the workers
as ``python -m pushfan.cli worker`` configured only by ``PUSHFAN_*`` variables, on topics
and a consumer group of their own per phase, with ``FCM_PER_MINUTE=0`` (no rate limit).
Where the machine has two cores or more and ``taskset`` exists, a single worker runs alone
on the first core; the emulators, this process, PostgreSQL when it runs on this machine
(embedded or not) and the Tansu broker on the last, as servers of their own would not
share the worker's core. Two workers may both run on every core, sharing them with the
rest: no placement gives them a core each on two cores.

1. **Senders' own rate**: the lean FCM and APNs senders (``bench/senders.py``) from this
   process, moved to the worker's core, against the same emulator process: each alone,
   then both at once in this audience's platform mix, before and after the broadcasts
   (the machine drifts). The mean of the last two is the baseline of the end-to-end
   ratio.
2. **One worker**: warmed up (single-user jobs on every partition, so it has joined the
   group and opened its connections), then one segment job is published and the clock
   runs from the publish to the ledger saying ``completed``. Printed: tokens/s, the ratio
   to the senders' rate, the time per stage from the worker's ``/metrics``
   (``pushfan_worker_stage_seconds`` by stage, the warm-up subtracted: resolve, query,
   send and report per page, commit per record, a shard or the job), its peak RSS
   (``VmHWM``), the cores each process used meanwhile and each cpu's busy share (from
   ``/proc``), and the worker's CPU per token next to the senders' own.
3. **Two workers** in one group, the same broadcast under a new job_id: the speed-up over
   one. On two cores the emulators, PostgreSQL and both workers share the machine, so
   the ratio says what this machine allows, not what the worker would do with a core
   each; the pages each worker sent show how evenly the shards were shared.
4. **Latency-bound, one worker and two** (``--latency-ms``, default 100; 0 skips it):
   the same two steps on the first ``--latency-users`` users (default 20,000: 4 shards;
   an audience of one shard would leave one of the two workers idle), with both
   emulators holding every response ``latency_ms`` (``PUT /_emulator/script``) and each
   worker's senders keeping at most ``--latency-in-flight`` requests in flight per
   platform (its ``PUSHFAN_FCM__CONCURRENCY`` and ``PUSHFAN_APNS__CONCURRENCY``; default
   100). One worker's rate is then bound by its requests in flight over the latency
   (2,000 tokens/s with the defaults), as a real worker's is by FCM's and APNs' tens of
   ms per request, not by its CPU. Printed: two workers' speed-up against issue #5's
   target of 1.7x, both rates, the workers' cores and each cpu's busy share, which must
   stay well under 100% for the ratio to speak of the workers rather than the machine.
   The emulators are reset afterwards.
5. **One core** (``--core-users``, default 100,000; 0 skips it; issue #9): one worker
   alone on its core against ``nghttpd`` (``bench/nghttpd.py``: a C server answering
   every send with a canned 200, on the other core with PostgreSQL and the broker), on
   the first users: an FCM-only broadcast and an APNs-only one (a token per user each),
   with the lean senders and then the ``h2``-library reference in the same run: per
   platform, tokens/s end to end against the target of 50,000, the pace from 10% to 90%
   of the users, the worker's CPU per token and the ratio to the reference; and
   rendering's share of a send (the job once, each token spliced in), timed alone here.
   nghttpd keeps no log, so the ledger's counts are the check there.
6. **The delivery policy's cost** (``--policy-users``, default 60,000; 0 skips it): one
   worker, four broadcasts to the first users, alternately without preferences and with
   quiet hours for 30% of them, in several zones, which they are all outside of now
   (``bench/fanout/policy.py``): every token is still sent, so the rate lost is what
   the policy costs, against issue #6's target of under 10%.
7. With ``--big``: one worker, 1,000,000 users (a database of its own), for peak RSS.

Before each broadcast every token's delivery day (``token_deliveries``) is set to
yesterday and the tables vacuumed, so every broadcast writes the same rows, as the first
broadcast of a day does (the report stage marks a token at most once a day: a second
broadcast on the same day would skip those writes). Every token must be
delivered exactly once by the emulators' log and counted once by the ledger. Nothing
asserts a time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.cpu import find_postmaster, pin_tree
from bench.fanout.cpus import Placement, pin_threads, placement, tansu_pid
from bench.fanout.phases import (
    LatencyBound,
    big_broadcast,
    broadcasts,
    latency_bound,
    one_core,
)
from bench.fanout.policy import policy_cost
from bench.senders import EmulatorProcess, start_emulator_process
from pushfan.db import migrate
from pushfan.settings import Settings
from pushfan.stack import Stack

__all__ = ["LatencyBound", "run"]


async def _bench(
    settings: Settings,
    url: str,
    big_url: str | None,
    em: EmulatorProcess,
    users: int,
    sends: int,
    where: Placement,
    logdir: Path,
    latency: LatencyBound | None,
    policy_users: int,
    core_users: int,
) -> None:
    one, base = await broadcasts(settings, url, em, users, sends, where, logdir)
    if core_users:
        await one_core(settings, url, em, core_users, where, logdir)
    if latency is not None:
        await latency_bound(settings, url, em, latency, where, logdir)
    if policy_users:
        await policy_cost(settings, url, em, policy_users, where, logdir)
    if big_url is not None:
        await big_broadcast(settings, big_url, em, where, logdir, one, base)


def run(
    stack: Stack,
    settings: Settings,
    users: int,
    sends: int,
    *,
    big: bool = False,
    latency: LatencyBound | None = None,
    policy_users: int = 0,
    core_users: int = 0,
) -> None:
    """The fanout benchmark on ``stack``'s broker, in fresh databases on its server;
    with ``latency``, the latency-bound comparison too (its users at most ``users``);
    with ``core_users``, issue #9's one-core figure against nghttpd on that many users
    (at most ``users``); with ``policy_users``, the delivery policy's cost on that many
    users (at most
    ``users``)."""
    if latency is not None:
        latency = replace(latency, users=min(latency.users, users))
    policy_users = min(policy_users, users)
    core_users = min(core_users, users)
    url = stack.database.create_sibling("pushfan_bench_fanout")
    big_url = stack.database.create_sibling("pushfan_bench_big") if big else None
    asyncio.run(migrate(url))
    if big_url is not None:
        asyncio.run(migrate(big_url))
    everywhere = os.sched_getaffinity(0)
    where = placement(tuple(sorted(everywhere)))
    # The servers on this machine (PostgreSQL, embedded or not, and the Tansu broker) move
    # off the worker's core, as servers of their own would not share it; this process too.
    # A PostgreSQL this bench did not start gets its affinity back at the end.
    postmaster = asyncio.run(find_postmaster(url))
    broker = tansu_pid() if stack.broker.kind == "tansu" else None
    if where.rest is not None:
        pinned = ("PostgreSQL",) if postmaster is not None else ()
        where = replace(where, pinned=pinned + (("the broker",) if broker is not None else ()))
    logdir = Path(tempfile.mkdtemp(prefix="pushfan-bench-fanout-"))
    em = start_emulator_process(where.rest)
    try:
        if where.rest is not None:
            if postmaster is not None:
                pin_tree(postmaster, {where.rest})
            if broker is not None:
                pin_threads(broker, {where.rest})
            os.sched_setaffinity(0, {where.rest})
        asyncio.run(
            _bench(
                settings,
                url,
                big_url,
                em,
                users,
                sends,
                where,
                logdir,
                latency,
                policy_users,
                core_users,
            )
        )
    finally:
        os.sched_setaffinity(0, everywhere)
        if postmaster is not None:
            pin_tree(postmaster, everywhere)
        if broker is not None:
            pin_threads(broker, everywhere)
        em.stop()
        shutil.rmtree(logdir, ignore_errors=True)
