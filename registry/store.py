"""The device-token table's writes and reads: the registry is its only writer.

Token rules, each kept by one statement (one round trip) here:

1. A token belongs to one user: registering it for another user moves the row
   (upsert on the token).
2. A user may have many active tokens.
3. A device (``app_id``, ``device_id``) has at most one active token: registering a new
   token for it deactivates the old one (reason ``replaced``) in the same statement.
4. Logout deactivates at once (reason ``logout``); a later registration reactivates.

Registering is idempotent: the same call again changes nothing but ``last_seen_at``,
which records the latest registration. The cleanup consumer and hygiene compare against
it, so a token registered again after a failed send is not deactivated by that failure.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

# Read through a CTE the INSERT consumes (count(*)), so the old token of the device is
# deactivated before the new row meets the unique index of active devices; a CTE the
# INSERT does not read would run after it and the index would refuse the row.
REGISTER_SQL = """
WITH prior AS (
    SELECT user_id, is_active FROM device_tokens WHERE token = $1
), replaced AS (
    UPDATE device_tokens
       SET is_active = false, deactivated_at = now(), deactivation_reason = 'replaced',
           updated_at = now()
     WHERE app_id = $5 AND device_id = $4 AND is_active AND token <> $1
    RETURNING 1
), upserted AS (
    INSERT INTO device_tokens AS d
           (token, user_id, platform, device_id, app_id, app_version, locale, time_zone)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM (SELECT count(*) FROM replaced) AS r
    ON CONFLICT (token) DO UPDATE SET
        user_id = EXCLUDED.user_id, platform = EXCLUDED.platform,
        device_id = EXCLUDED.device_id, app_id = EXCLUDED.app_id,
        app_version = EXCLUDED.app_version, locale = EXCLUDED.locale,
        time_zone = EXCLUDED.time_zone,
        is_active = true, deactivated_at = NULL, deactivation_reason = NULL,
        updated_at = CASE
            WHEN d.is_active AND (d.user_id, d.platform, d.device_id, d.app_id,
                                  d.app_version, d.locale, d.time_zone)
                 IS NOT DISTINCT FROM
                 (EXCLUDED.user_id, EXCLUDED.platform, EXCLUDED.device_id, EXCLUDED.app_id,
                  EXCLUDED.app_version, EXCLUDED.locale, EXCLUDED.time_zone)
            THEN d.updated_at ELSE now() END,
        last_seen_at = now()
    RETURNING d.id, d.created_at, d.updated_at, d.last_seen_at
)
SELECT u.id, u.created_at, u.updated_at, u.last_seen_at,
       (SELECT count(*) FROM replaced) AS replaced,
       p.user_id AS prior_user, p.is_active AS prior_active
  FROM upserted u LEFT JOIN prior p ON true
"""

_DEVICE_COLUMNS = """id, token, platform, device_id, app_id, app_version, locale, time_zone,
       created_at, updated_at, last_seen_at"""

LIST_SQL = f"""
SELECT {_DEVICE_COLUMNS} FROM device_tokens
 WHERE user_id = $1 AND is_active ORDER BY created_at, id
"""

LOGOUT_DEVICE_SQL = """
UPDATE device_tokens
   SET is_active = false, deactivated_at = now(), deactivation_reason = 'logout',
       updated_at = now()
 WHERE user_id = $1 AND device_id = $2 AND is_active AND ($3::text IS NULL OR app_id = $3)
RETURNING id
"""

LOGOUT_TOKEN_SQL = """
UPDATE device_tokens
   SET is_active = false, deactivated_at = now(), deactivation_reason = 'logout',
       updated_at = now()
 WHERE user_id = $1 AND token = $2 AND is_active
RETURNING id
"""

# Taken only after a registration lost a race for its device (see register()).
LOCK_DEVICE_SQL = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"

#: Runs under the device lock before giving up (a registration racing in without the
#: lock can still win in between; it then waits its turn too).
REGISTER_ATTEMPTS = 5


class Change(StrEnum):
    """What a registration did to the table (for the response and the metrics)."""

    CREATED = "created"  # a token never seen
    REFRESHED = "refreshed"  # the caller's active token again (maybe with new details)
    REACTIVATED = "reactivated"  # the caller's token after a logout or deactivation
    MOVED = "moved"  # a token another user had: the hand-me-down phone


@dataclass(frozen=True, slots=True)
class Registration:
    token: str
    platform: str
    device_id: str
    app_id: str
    app_version: str | None = None
    locale: str | None = None
    time_zone: str | None = None


@dataclass(frozen=True, slots=True)
class Registered:
    id: int
    change: Change
    replaced: int  # other tokens of this device deactivated (0 or 1)
    created_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class Device:
    """One active token of a user. ``token`` is the secret: show it masked."""

    id: int
    token: str
    platform: str
    device_id: str | None
    app_id: str
    app_version: str | None
    locale: str | None
    time_zone: str | None
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime


Executor = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool


async def register(db: Executor, user_id: str, reg: Registration) -> Registered:
    """Register (or refresh, move, reactivate) ``reg.token`` for ``user_id``.

    Two concurrent registrations of different tokens for one device can collide on the
    unique index of active devices; the losers run again one at a time, each replacing
    the one before (the later registration wins, as it would have a moment later).
    """
    args = (
        reg.token,
        user_id,
        reg.platform,
        reg.device_id,
        reg.app_id,
        reg.app_version,
        reg.locale,
        reg.time_zone,
    )
    try:
        row = await db.fetchrow(REGISTER_SQL, *args)
    except asyncpg.UniqueViolationError:
        row = await _register_serialised(db, args)
    assert row is not None
    return Registered(
        id=row["id"],
        change=_change(row["prior_user"], row["prior_active"], user_id),
        replaced=row["replaced"],
        created_at=row["created_at"],
        last_seen_at=row["last_seen_at"],
    )


async def _register_serialised(db: Executor, args: tuple[Any, ...]) -> asyncpg.Record:
    """The registration again, under a lock on its device, so racing registrations of
    one device take turns (each statement then sees the one before it)."""
    key = f"{args[4]}/{args[3]}"  # app_id/device_id
    async with contextlib.AsyncExitStack() as stack:
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
        if isinstance(db, asyncpg.Pool):
            conn = await stack.enter_async_context(db.acquire())
        else:
            conn = db
        for attempt in range(REGISTER_ATTEMPTS):
            try:
                async with conn.transaction():
                    await conn.execute(LOCK_DEVICE_SQL, key)
                    row = await conn.fetchrow(REGISTER_SQL, *args)
                    assert row is not None
                    return row
            except asyncpg.UniqueViolationError:
                if attempt == REGISTER_ATTEMPTS - 1:
                    raise
    raise AssertionError("unreachable")


def _change(prior_user: str | None, prior_active: bool | None, user_id: str) -> Change:
    if prior_user is None:
        return Change.CREATED
    if prior_user != user_id:
        return Change.MOVED
    return Change.REFRESHED if prior_active else Change.REACTIVATED


async def devices(db: Executor, user_id: str) -> list[Device]:
    """The user's active tokens, oldest first."""
    return [_device(row) for row in await db.fetch(LIST_SQL, user_id)]


def _device(row: Any) -> Device:
    return Device(**{name: row[name] for name in Device.__slots__})


async def logout_device(
    db: Executor, user_id: str, device_id: str, app_id: str | None = None
) -> int:
    """Deactivate the user's active token(s) of ``device_id`` (of one app if given);
    returns how many. Another user's device counts as not found."""
    return len(await db.fetch(LOGOUT_DEVICE_SQL, user_id, device_id, app_id))


async def logout_token(db: Executor, user_id: str, token: str) -> int:
    """Deactivate ``token`` if it is the user's and active; returns 1 or 0."""
    return len(await db.fetch(LOGOUT_TOKEN_SQL, user_id, token))
