"""Migrations on a real PostgreSQL: idempotent, safe when run concurrently, and refusing
inconsistent deployments; plus the token rules the schema itself enforces."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace

import asyncpg
import pytest

from pushfan.db import load_migrations, migrate, schema_version
from pushfan.errors import SetupError
from worker.ledger import mark_delivered

TABLES = {
    "device_tokens",
    "user_preferences",
    "notification_preferences",
    "segment_members",
    "jobs",
    "job_shards",
    "schema_migrations",
}


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


async def test_applies_everything_once_then_nothing(empty_database_url: str) -> None:
    shipped = load_migrations()
    assert await schema_version(empty_database_url) == 0

    first = await migrate(empty_database_url)
    second = await migrate(empty_database_url)

    assert [m.version for m in first] == [m.version for m in shipped]
    assert second == []
    assert await schema_version(empty_database_url) == shipped[-1].version
    assert await _tables(empty_database_url) >= TABLES


async def test_concurrent_migrations_apply_each_version_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database_url) for _ in range(4)))

    applied = [m.version for batch in results for m in batch]
    assert sorted(applied) == [m.version for m in load_migrations()]
    conn = await asyncpg.connect(empty_database_url)
    try:
        rows = await conn.fetch("SELECT version, count(*) AS n FROM schema_migrations GROUP BY 1")
    finally:
        await conn.close()
    assert all(r["n"] == 1 for r in rows)


def test_two_processes_migrating_at_once_both_succeed(
    empty_database_url: str, service_env: dict[str, str]
) -> None:
    env = {**service_env, "DATABASE_URL": empty_database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pushfan.cli", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], outputs
    said = [out for out, _ in outputs]
    # Exactly one of them did the work; the other waited on the lock and found none.
    assert sum("applied 0001_initial" in s for s in said) == 1, said
    assert sum("database is up to date" in s for s in said) == 1, said


async def test_an_edited_applied_migration_is_refused(empty_database_url: str) -> None:
    await migrate(empty_database_url)
    edited = [replace(m, sql=m.sql + "\n-- edited\n") for m in load_migrations()]

    with pytest.raises(SetupError, match=r"migration 1 \(initial\) changed after it was applied"):
        await migrate(empty_database_url, edited)


async def test_a_database_newer_than_the_code_is_refused(empty_database_url: str) -> None:
    await migrate(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
        )
    finally:
        await conn.close()

    with pytest.raises(SetupError, match=r"migration 999 .* does not know"):
        await migrate(empty_database_url)


async def test_unreachable_database_is_a_setup_error() -> None:
    with pytest.raises(SetupError, match="cannot reach PostgreSQL"):
        await migrate("postgresql://nobody@127.0.0.1:1/none")


# --- what the schema enforces -----------------------------------------------------------

UPSERT = """
INSERT INTO device_tokens (token, user_id, platform, device_id, app_id)
VALUES ($1, $2, $3, $4, 'app')
ON CONFLICT (token) DO UPDATE
   SET user_id = EXCLUDED.user_id, device_id = EXCLUDED.device_id,
       is_active = true, deactivated_at = NULL, updated_at = now()
RETURNING id
"""


async def test_a_token_registered_by_another_user_moves(conn: asyncpg.Connection) -> None:
    first = await conn.fetchval(UPSERT, "tok-hand-me-down", "mother", "android", "phone-1")
    second = await conn.fetchval(UPSERT, "tok-hand-me-down", "daughter", "android", "phone-1")

    rows = await conn.fetch(
        "SELECT user_id FROM device_tokens WHERE token = $1", "tok-hand-me-down"
    )
    assert first == second
    assert [r["user_id"] for r in rows] == ["daughter"]


async def test_one_device_has_at_most_one_active_token(conn: asyncpg.Connection) -> None:
    await conn.fetchval(UPSERT, "tok-old", "u1", "ios", "iphone-1")

    with pytest.raises(asyncpg.UniqueViolationError, match="device_tokens_active_device_idx"):
        await conn.fetchval(UPSERT, "tok-new", "u1", "ios", "iphone-1")


async def test_a_user_may_have_many_tokens(conn: asyncpg.Connection) -> None:
    for token, device in [("t-a", "ipad"), ("t-b", "iphone"), ("t-c", "pixel")]:
        await conn.fetchval(UPSERT, token, "many", "ios", device)

    n = await conn.fetchval(
        "SELECT count(*) FROM device_tokens WHERE user_id = ANY($1) AND is_active", ["many"]
    )
    assert n == 3


@pytest.mark.parametrize(
    ("column_values", "constraint"),
    [
        ("('t', 'u', 'blackberry', true, NULL)", "device_tokens_platform_check"),
        ("('t', 'u', 'ios', false, NULL)", "device_tokens_inactive_has_time"),
        ("('', 'u', 'ios', true, NULL)", "device_tokens_token_length"),
    ],
)
async def test_the_schema_rejects_impossible_rows(
    conn: asyncpg.Connection, column_values: str, constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match=constraint):
        await conn.execute(
            "INSERT INTO device_tokens (token, user_id, platform, is_active, deactivated_at) "
            f"VALUES {column_values}"
        )


async def test_a_failing_migration_is_named_and_rolled_back(empty_database_url: str) -> None:
    broken = [*load_migrations()]
    broken.append(
        replace(broken[0], version=len(broken) + 1, name="broken", sql="CREATE TABLE x (;")
    )

    with pytest.raises(SetupError, match=r"migration \d+ \(broken\) failed and was rolled back"):
        await migrate(empty_database_url, broken)

    # Everything before it stays applied; the broken one left nothing behind.
    assert await schema_version(empty_database_url) == len(broken) - 1
    assert "x" not in await _tables(empty_database_url)


async def test_0004_moves_delivery_times_to_token_deliveries(empty_database_url: str) -> None:
    shipped = load_migrations()
    upto3 = [m for m in shipped if m.version <= 3]
    await migrate(empty_database_url, upto3)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            "INSERT INTO device_tokens (user_id, platform, token, last_delivered_at) VALUES"
            " ('u1', 'android', 'tok-a', '2026-03-04 23:30:00+00'),"
            " ('u1', 'ios', 'tok-b', '2026-03-05 01:00:00+05'),"
            " ('u2', 'android', 'tok-c', NULL)"
        )
        await migrate(empty_database_url)
        rows = await conn.fetch(
            "SELECT t.token, d.delivered_on::text FROM token_deliveries d"
            " JOIN device_tokens t ON t.id = d.token_id ORDER BY t.token"
        )
        gone = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'device_tokens' AND column_name = 'last_delivered_at'"
        )
    finally:
        await conn.close()
    # Days in UTC: 01:00 at +05 is the 4th there.
    assert [tuple(r) for r in rows] == [("tok-a", "2026-03-04"), ("tok-b", "2026-03-04")]
    assert gone == 0


async def test_0005_leaves_room_for_a_new_day_s_mark_in_the_page(
    empty_database_url: str,
) -> None:
    await migrate(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE relname = 'token_deliveries'"
        )
        ids = list(range(1, 2001))
        await conn.execute(
            "INSERT INTO token_deliveries (token_id, delivered_on)"
            " SELECT i, current_date - 1 FROM unnest($1::bigint[]) AS i",
            ids,
        )
        # The counters of the current transaction are read before it commits.
        async with conn.transaction():
            await conn.execute(f"WITH used AS ({mark_delivered('$1')}) SELECT 1", ids)
            row = await conn.fetchrow(
                "SELECT pg_stat_get_xact_tuples_hot_updated(c.oid),"
                " pg_stat_get_xact_tuples_updated(c.oid)"
                " FROM pg_class c WHERE relname = 'token_deliveries'"
            )
            assert row is not None
            hot, updated = row
    finally:
        await conn.close()
    assert options == ["fillfactor=50"]
    assert updated == len(ids)
    assert hot == len(ids)  # every mark stayed in its page: no index entry written
