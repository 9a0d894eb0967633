"""The delivery policy's cost (issue #6): one worker broadcasting to the same users with
no preferences and with 30% of them having quiet hours.

Quiet windows are spread over several time zones and placed a few hours after each
zone's local time now, so every user is outside theirs: every token is still sent, and
the difference is what the policy itself costs (the page query's join on
``user_preferences``, the window arithmetic per distinct (zone, window) of a page), not
fewer sends. Runs alternate plain, quiet, quiet, plain, so a machine drifting one way
over the phase weighs on both sides alike.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg

from bench.fanout.broadcast import Broadcast, broadcast, phase_settings
from bench.fanout.cpus import Placement
from bench.fanout.report import report
from bench.fanout.seed import subsegment
from bench.senders import EmulatorProcess
from pushfan.settings import Settings

QUIET_SHARE = 0.3
ZONES = ("Asia/Tokyo", "America/New_York", "Europe/Berlin", "Australia/Sydney", "Asia/Kolkata")
COST_TARGET = 0.10  # the policy costs under 10% of the end-to-end rate


async def _quiet_hours(conn: asyncpg.Connection, segment: str) -> int:
    """Give ``QUIET_SHARE`` of the segment's users quiet hours they are outside of now."""
    now = datetime.now(UTC)
    windows = []
    for zone in ZONES:
        local = now.astimezone(ZoneInfo(zone))
        start = (local + timedelta(hours=3)).time().replace(second=0, microsecond=0)
        end = (local + timedelta(hours=9)).time().replace(second=0, microsecond=0)
        windows.append((zone, start, end))
    status = await conn.execute(
        "INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end)"
        " SELECT m.user_id, (w.z)[1 + abs(hashtext(m.user_id)) % $3],"
        "        (w.s)[1 + abs(hashtext(m.user_id)) % $3],"
        "        (w.e)[1 + abs(hashtext(m.user_id)) % $3]"
        "   FROM segment_members m,"
        "        (SELECT $4::text[] AS z, $5::time[] AS s, $6::time[] AS e) w"
        "  WHERE m.segment = $1 AND abs(hashtext(m.user_id || 'q')) % 1000 < $2",
        segment,
        round(QUIET_SHARE * 1000),
        len(windows),
        [w[0] for w in windows],
        [w[1] for w in windows],
        [w[2] for w in windows],
    )
    await conn.execute("VACUUM ANALYZE user_preferences")
    return int(status.split()[-1])


async def policy_cost(
    settings: Settings,
    url: str,
    em: EmulatorProcess,
    users: int,
    where: Placement,
    logdir: Path,
) -> None:
    """Four one-worker broadcasts to the first ``users`` users (seeded already): without
    preferences, with quiet hours for 30% of them (twice), without again. Printed."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    runs: dict[str, list[Broadcast]] = {"plain": [], "quiet": []}
    try:
        segment = f"bench-policy-{uuid.uuid4().hex[:6]}"
        tokens = sum((await subsegment(conn, users, segment)).values())
        quiet_users = 0
        for i, kind in enumerate(("plain", "quiet", "quiet", "plain")):
            if kind == "quiet" and not quiet_users:
                quiet_users = await _quiet_hours(conn, segment)
            if kind == "plain" and quiet_users:
                await conn.execute("TRUNCATE user_preferences")
                quiet_users = 0
            runs[kind].append(
                await broadcast(
                    f"1 worker, {kind} #{i + 1}",
                    phase_settings(settings, url, em, f"policy-{i}"),
                    conn,
                    em,
                    segment,
                    users,
                    tokens,
                    [where.worker],
                    logdir,
                )
            )
    finally:
        await conn.execute("TRUNCATE user_preferences")
        await conn.close()
    for run in runs["plain"] + runs["quiet"]:
        report(run, None)

    def rate(kind: str) -> float:
        return sum(r.tokens for r in runs[kind]) / sum(r.seconds for r in runs[kind])

    def cpu_us(kind: str) -> float:
        return (
            sum(r.worker_cores * r.seconds for r in runs[kind])
            / sum(r.tokens for r in runs[kind])
            * 1e6
        )

    cost = 1 - rate("quiet") / rate("plain")
    exact = not any(r.problems() for r in runs["plain"] + runs["quiet"])
    print(
        f"fanout policy: {users:,} users, {QUIET_SHARE:.0%} with quiet hours (outside them"
        f" now, in {len(ZONES)} zones): {rate('quiet'):,.0f} tokens/s against"
        f" {rate('plain'):,.0f} without; the policy costs {cost:.1%} of the rate (target"
        f" under {COST_TARGET:.0%}, {'met' if cost < COST_TARGET else 'NOT MET'}); worker"
        f" CPU {cpu_us('quiet'):.0f} against {cpu_us('plain'):.0f} us/token;"
        f" {'every token delivered exactly once' if exact else 'NOT EXACT, see above'};"
        f" the phase took {time.perf_counter() - started:.0f} s"
    )
