"""The demo population ``pushfan up`` seeds: who has which devices, who is asleep, who
opted out, whose tokens the platforms will report dead.

User ``i`` of ``n`` (``demo-0000000`` ...), by rules chosen so that every group holds
both platforms:

- devices: six in ten have an Android phone, three in ten an iPhone, one in ten both;
- quiet hours: users of every tenth block of ten are inside their quiet hours now, in
  one of four time zones (the window began in the previous hour and lasts eight);
- opted out: every twentieth block turned the broadcast's type off;
- dead: every fiftieth block holds tokens the emulators answer ``UNREGISTERED`` (FCM)
  or ``410 Unregistered`` (APNs) for; these users are neither asleep nor opted out, so
  their dead tokens are sent to, reported and cleaned up.

Seeding is an upsert on the token, as an app registering again would do: the demo runs
again on the same database with the same outcome (a token cleaned up last time is live
again until the emulators report it once more).
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import asyncpg

SEGMENT = "demo-everyone"
ZONES = ("Asia/Tokyo", "Europe/Berlin", "America/New_York", "Australia/Sydney")


@dataclass
class Population:
    """What was seeded, per platform (``android``, ``ios``), in tokens."""

    users: int
    tokens: Counter[str] = field(default_factory=Counter)
    quiet: Counter[str] = field(default_factory=Counter)  # held until quiet hours end
    opted_out: Counter[str] = field(default_factory=Counter)
    dead: dict[str, list[str]] = field(default_factory=dict)
    quiet_users: int = 0
    opted_out_users: int = 0

    def expected_delivered(self, platform: str) -> int:
        return (
            self.tokens[platform]
            - self.quiet[platform]
            - self.opted_out[platform]
            - len(self.dead.get(platform, ()))
        )


def fcm_token(tag: str) -> str:
    return f"demo{tag}:APA91b{'d' * 120}"


def apns_token(tag: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_OID, tag).hex * 2


def _platforms(i: int) -> tuple[str, ...]:
    r = i % 10
    return ("android",) if r < 6 else ("ios",) if r < 9 else ("android", "ios")


def _quiet_window(zone: str, now: datetime) -> tuple[time, time]:
    """A window that holds ``now`` in ``zone``: from the start of the previous hour, for
    eight hours."""
    local = now.astimezone(ZoneInfo(zone))
    start = local.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    return start.time(), (start + timedelta(hours=8)).time()


async def seed(pool: asyncpg.Pool, users: int, notification_type: str, now: datetime) -> Population:
    """Seed ``users`` demo users into :data:`SEGMENT` (idempotent); what was seeded."""
    pop = Population(users)
    ids: list[str] = []
    rows: tuple[list[str], list[str], list[str]] = ([], [], [])
    quiet: list[tuple[str, str, time, time]] = []  # user, zone, start, end
    out: list[str] = []
    for i in range(users):
        user = f"demo-{i:07d}"
        ids.append(user)
        block = i // 10
        asleep, opted, dead = block % 10 == 0, block % 20 == 5, block % 50 == 7
        if asleep:
            zone = ZONES[block // 10 % len(ZONES)]
            quiet.append((user, zone, *_quiet_window(zone, now)))
        if opted:
            out.append(user)
        for platform in _platforms(i):
            token = fcm_token(user) if platform == "android" else apns_token(user)
            for column, value in zip(rows, (user, platform, token), strict=True):
                column.append(value)
            pop.tokens[platform] += 1
            if asleep:
                pop.quiet[platform] += 1
            elif opted:
                pop.opted_out[platform] += 1
            elif dead:
                pop.dead.setdefault(platform, []).append(token)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_TOKENS_SQL, *rows)
        await conn.execute(_SEGMENT_SQL, SEGMENT, ids)
        await conn.execute(_CLEAR_QUIET_SQL, ids)
        await conn.execute(_QUIET_SQL, *([q[k] for q in quiet] for k in range(4)))
        await conn.execute(_CLEAR_OPT_OUT_SQL, ids, notification_type)
        await conn.execute(_OPT_OUT_SQL, out, notification_type)
    pop.quiet_users, pop.opted_out_users = len(quiet), len(out)
    return pop


_TOKENS_SQL = """
INSERT INTO device_tokens (user_id, platform, token)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT (token) DO UPDATE
   SET user_id = EXCLUDED.user_id, platform = EXCLUDED.platform, is_active = true,
       deactivated_at = NULL, deactivation_reason = NULL, updated_at = now(),
       last_seen_at = now()
"""
_SEGMENT_SQL = """
INSERT INTO segment_members (segment, user_id) SELECT $1, unnest($2::text[])
ON CONFLICT DO NOTHING
"""
_CLEAR_QUIET_SQL = "DELETE FROM user_preferences WHERE user_id = ANY($1::text[])"
_QUIET_SQL = """
INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end)
SELECT * FROM unnest($1::text[], $2::text[], $3::time[], $4::time[])
"""
_CLEAR_OPT_OUT_SQL = """
DELETE FROM notification_preferences WHERE user_id = ANY($1::text[]) AND notification_type = $2
"""
_OPT_OUT_SQL = """
INSERT INTO notification_preferences (user_id, notification_type, push_enabled)
SELECT unnest($1::text[]), $2, false
"""
