"""Per-user delivery preferences: quiet hours in the user's time zone, push per type.

The worker reads them in its page query (``worker/tokens.py``); the registry is their
only writer. A PUT replaces them whole, in one transaction.
"""

from __future__ import annotations

from datetime import time

import asyncpg

GET_SQL = """
SELECT p.time_zone, p.quiet_start, p.quiet_end,
       coalesce((SELECT array_agg(n.notification_type ORDER BY n.notification_type)
                   FROM notification_preferences n WHERE n.user_id = $1), '{}') AS types,
       coalesce((SELECT array_agg(n.push_enabled ORDER BY n.notification_type)
                   FROM notification_preferences n WHERE n.user_id = $1), '{}') AS enabled
  FROM (SELECT $1::text AS user_id) AS u
  LEFT JOIN user_preferences p ON p.user_id = u.user_id
"""

PUT_USER_SQL = """
INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end)
VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id) DO UPDATE SET time_zone = EXCLUDED.time_zone,
    quiet_start = EXCLUDED.quiet_start, quiet_end = EXCLUDED.quiet_end, updated_at = now()
"""

PUT_TYPES_SQL = """
WITH gone AS (
    DELETE FROM notification_preferences
     WHERE user_id = $1 AND NOT (notification_type = ANY($2::text[]))
)
INSERT INTO notification_preferences (user_id, notification_type, push_enabled)
SELECT $1, t, e FROM unnest($2::text[], $3::boolean[]) AS x(t, e)
ON CONFLICT (user_id, notification_type) DO UPDATE
   SET push_enabled = EXCLUDED.push_enabled, updated_at = now()
"""

Preferences = tuple[str, tuple[time, time] | None, dict[str, bool]]
"""(time zone, quiet hours (start, end) or None, push on/off per type)."""


async def get(db: asyncpg.Pool | asyncpg.Connection, user_id: str) -> Preferences:
    """The user's preferences; defaults (UTC, no quiet hours, every type on) if none."""
    row = await db.fetchrow(GET_SQL, user_id)
    assert row is not None
    quiet = None
    if row["quiet_start"] is not None:
        quiet = (row["quiet_start"], row["quiet_end"])
    types = dict(zip(row["types"], row["enabled"], strict=True))
    return row["time_zone"] or "UTC", quiet, types


async def put(
    pool: asyncpg.Pool,
    user_id: str,
    time_zone: str,
    quiet: tuple[time, time] | None,
    types: dict[str, bool],
) -> None:
    """Replace the user's preferences."""
    start, end = quiet if quiet is not None else (None, None)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(PUT_USER_SQL, user_id, time_zone, start, end)
        await conn.execute(PUT_TYPES_SQL, user_id, list(types), list(types.values()))
