"""The page query on the real database: every active token of the page's users, with their
policy for the job's type, in one round trip."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta

import asyncpg
import pytest

from schemas import Platform
from worker.tokens import PAGE_TOKENS_SQL, SPAN_TOKENS_SQL, fetch_page_tokens, fetch_span_tokens


async def _seed(conn: asyncpg.Connection) -> None:
    await conn.executemany(
        "INSERT INTO device_tokens (token, user_id, platform, device_id, is_active, deactivated_at)"
        " VALUES ($1, $2, $3, $4, $5, CASE WHEN $5 THEN NULL ELSE now() END)",
        [
            ("and-1", "alice", "android", "pixel", True),
            ("and-2", "alice", "android", "tablet", True),
            ("ios-1", "alice", "ios", "iphone", True),
            ("ios-old", "alice", "ios", "old-iphone", False),  # logged out
            ("ios-b", "bob", "ios", "b-iphone", True),
            ("web-c", "carol", "web", "c-browser", True),
        ],
    )
    await conn.execute(
        "INSERT INTO notification_preferences (user_id, notification_type, push_enabled)"
        " VALUES ('bob', 'marketing', false)"
    )
    await conn.execute(
        "INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end)"
        " VALUES ('alice', 'Asia/Tokyo', '22:00', '07:00')"
    )


async def test_every_active_token_of_the_page_and_only_those(conn: asyncpg.Connection) -> None:
    await _seed(conn)

    rows = await fetch_page_tokens(conn, ["alice", "bob", "nobody"], "order_shipped")

    assert sorted(r.token for r in rows) == ["and-1", "and-2", "ios-1", "ios-b"]
    alice = next(r for r in rows if r.token == "ios-1")
    assert (alice.time_zone, alice.quiet_start, alice.quiet_end) == (
        "Asia/Tokyo",
        time(22, 0),
        time(7, 0),
    )
    assert all(r.push_enabled for r in rows)


async def test_the_type_preference_rides_along(conn: asyncpg.Connection) -> None:
    await _seed(conn)

    marketing = await fetch_page_tokens(conn, ["bob"], "marketing")
    shipping = await fetch_page_tokens(conn, ["bob"], "order_shipped")

    assert [(r.token, r.push_enabled) for r in marketing] == [("ios-b", False)]
    assert [(r.token, r.push_enabled) for r in shipping] == [("ios-b", True)]


async def test_the_platform_filter(conn: asyncpg.Connection) -> None:
    await _seed(conn)

    rows = await fetch_page_tokens(conn, ["alice", "carol"], "news", platforms=["ios", "web"])

    assert sorted(r.token for r in rows) == ["ios-1", "web-c"]


async def test_repr_shows_no_token(conn: asyncpg.Connection) -> None:
    await _seed(conn)
    (row,) = await fetch_page_tokens(conn, ["carol"], "news")
    assert "web-c" not in repr(row)


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        (PAGE_TOKENS_SQL, (["alice", "bob"], "order_shipped", None, None, "")),
        (SPAN_TOKENS_SQL, ("alice", "order_shipped", None, None, "", "carol")),
    ],
    ids=["by-name", "by-range"],
)
async def test_the_query_can_use_the_active_user_index(
    conn: asyncpg.Connection, sql: str, args: tuple[object, ...]
) -> None:
    # With sequential scans priced out, the plan must find the partial index usable:
    # its predicate and leading column fit the query.
    await conn.execute("SET LOCAL enable_seqscan = off")
    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
    assert "device_tokens_active_user_idx" in plan, plan


async def test_a_range_of_users_gives_what_their_names_give(conn: asyncpg.Connection) -> None:
    """The "all" audience's read: (after, last] gives the rows the page's names give,
    policy columns included, and nothing from outside the range. User_ids of a prefix
    of their own: other tests' committed users sort among plain names."""
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    prefix = f"span-{uuid.uuid4().hex[:8]}"
    a, b, c, d, e = (f"{prefix}-{n}" for n in range(5))
    await conn.executemany(
        "INSERT INTO device_tokens (token, user_id, platform, device_id, is_active, deactivated_at)"
        " VALUES ($1 || $2, $2, $3, $1, $4, CASE WHEN $4 THEN NULL ELSE now() END)",
        [
            ("a-and-", a, "android", True),  # the page before's last user
            ("b-and1-", b, "android", True),
            ("b-and2-", b, "android", True),
            ("b-ios-", b, "ios", True),
            ("b-old-", b, "ios", False),  # logged out
            ("c-ios-", c, "ios", True),
            ("d-web-", d, "web", True),
            ("e-and-", e, "android", True),  # the next page's first user
        ],
    )
    await conn.execute(
        "INSERT INTO notification_preferences (user_id, notification_type, push_enabled)"
        " VALUES ($1, 'marketing', false)",
        c,
    )
    await conn.execute(
        "INSERT INTO user_preferences (user_id, time_zone, quiet_start, quiet_end)"
        " VALUES ($1, 'Asia/Tokyo', '22:00', '07:00')",
        b,
    )
    await conn.execute(
        "INSERT INTO low_priority_sends (user_id, job_id, sent_at) VALUES ($1, 'other', $2)",
        c,
        now - timedelta(hours=1),
    )

    cases: list[tuple[str, list[Platform] | None]] = [
        ("marketing", None),
        ("news", ["ios", "web"]),
        ("news", ["android"]),
    ]
    for kind, platforms in cases:
        for since in (None, now - timedelta(days=1)):
            by_name = await fetch_page_tokens(
                conn, [b, c, d], kind, platforms, cap_since=since, job_id="j"
            )
            by_range = await fetch_span_tokens(
                conn, a, d, kind, platforms, cap_since=since, job_id="j"
            )
            assert sorted(by_range) == sorted(by_name), (kind, platforms, since)
            assert by_name  # each case has rows to compare
    # The lower end is left out, the upper one kept.
    assert {r.user_id for r in await fetch_span_tokens(conn, b, c, "news")} == {c}
    assert {r.user_id for r in await fetch_span_tokens(conn, a, e, "news")} == {b, c, d, e}


@pytest.mark.parametrize("page", [0, 1, 1000])
async def test_pages_of_any_size_come_back_whole(conn: asyncpg.Connection, page: int) -> None:
    users = [f"bulk-{i}" for i in range(page)]
    await conn.executemany(
        "INSERT INTO device_tokens (token, user_id, platform) VALUES ($1, $2, 'android')",
        [(f"tok-{u}", u) for u in users],
    )
    rows = await fetch_page_tokens(conn, users, "news")
    assert len(rows) == page


async def test_rows_carry_the_users_recent_low_priority_sends_of_other_jobs(
    conn: asyncpg.Connection,
) -> None:
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    await conn.execute(
        "INSERT INTO device_tokens (token, user_id, platform) VALUES ('t-ann', 'ann', 'ios'),"
        " ('t-ben', 'ben', 'ios')"
    )
    await conn.executemany(
        "INSERT INTO low_priority_sends (user_id, job_id, sent_at) VALUES ($1, $2, $3)",
        [
            ("ann", "promo-1", now - timedelta(hours=1)),
            ("ann", "promo-2", now - timedelta(hours=2)),
            ("ann", "promo-old", now - timedelta(days=3)),  # outside the window
            ("ann", "this-job", now - timedelta(minutes=1)),  # a resend of this very job
        ],
    )

    capped = await fetch_page_tokens(
        conn, ["ann", "ben"], "news", cap_since=now - timedelta(days=1), job_id="this-job"
    )
    uncapped = await fetch_page_tokens(conn, ["ann", "ben"], "news")

    assert {r.user_id: r.recent_low for r in capped} == {"ann": 2, "ben": 0}
    assert {r.user_id: r.recent_low for r in uncapped} == {"ann": 0, "ben": 0}
