"""Fetch stage: one page of user_ids in, their active tokens and delivery policy out.

One round trip per page, whatever the page holds: the user's per-type opt-out, quiet
hours and recent low-priority sends (the frequency cap) ride along on each token row
through LEFT JOINs, so the policy stage never queries per user. Both queries read
``device_tokens_active_user_idx`` (partial on ``is_active``, ``user_id`` leading,
platform/id/token included): by the page's user_ids, or, for an ``all`` audience, as the
range of user_ids the page covers.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, time
from typing import NamedTuple

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from schemas import Platform

# The joined sides are narrowed by the same condition on user_id so they are read through
# their primary keys; joined bare, the planner hashes the whole preference tables for every
# page (measured: 12.9 ms against 2.9 ms a page of 1000 users, 30% of them with quiet hours).
_PAGE_SQL = """
SELECT t.id,
       t.user_id,
       t.platform,
       t.token,
       coalesce(np.push_enabled, true) AS push_enabled,
       up.time_zone,
       up.quiet_start,
       up.quiet_end,
       coalesce(ls.recent, 0) AS recent_low
  FROM device_tokens t
  LEFT JOIN (SELECT user_id, push_enabled
               FROM notification_preferences
              WHERE {users} AND notification_type = $2) np
         ON np.user_id = t.user_id
  LEFT JOIN (SELECT user_id, time_zone, quiet_start, quiet_end
               FROM user_preferences
              WHERE {users}) up
         ON up.user_id = t.user_id
  LEFT JOIN (SELECT user_id, count(*) AS recent
               FROM low_priority_sends
              WHERE $4::timestamptz IS NOT NULL
                AND {users} AND sent_at > $4 AND job_id <> $5
              GROUP BY user_id) ls
         ON ls.user_id = t.user_id
 WHERE {t_users}
   AND t.is_active
   AND ($3::text[] IS NULL OR t.platform = ANY($3::text[]))
"""


def _page_sql(users: str) -> str:
    """``_PAGE_SQL`` with ``users`` (a condition on the column ``{c}``) on every table."""
    return _PAGE_SQL.format(users=users.format(c="user_id"), t_users=users.format(c="t.user_id"))


# The page's users by name: one index lookup per user.
PAGE_TOKENS_SQL = _page_sql("{c} = ANY($1::text[])")

# The page's users as the range (after, last]: one index range scan. Only for an audience
# that is every user with an active token, where that range holds nobody else. Before
# version 17, PostgreSQL descends the index from its root for each element of an ANY
# array: on 15 the range costs a third to a quarter as much (100,000 users, pages of
# 1,000: 1.8-2.3 against 6.7-9.7 us of PostgreSQL CPU a token, preferences and the cap's
# log filled); 17 and later step between neighbouring elements, and on 18 the range read
# is only 1.12x as fast. A segment's range also holds non-members: the cheap plan for a
# dense segment scans every token between two members of a sparse one, and a prepared
# statement's generic plan cannot tell the two apart (measured on 15: 65-90 us a token),
# so segments keep the list.
SPAN_TOKENS_SQL = _page_sql("{c} > $1 AND {c} <= $6")


class PageToken(NamedTuple):
    """One active token of a page's user, with that user's policy for this job's type.

    A named tuple rather than a dataclass: a page makes thousands, straight from the
    query's rows (``_make``, in C), at a third of a dataclass's cost each."""

    id: int
    user_id: str
    platform: Platform
    token: str
    push_enabled: bool
    time_zone: str | None
    quiet_start: time | None
    quiet_end: time | None
    recent_low: int  # low-priority notifications of other jobs in the cap's window

    def __repr__(self) -> str:  # never a raw token where a person may read it
        return f"PageToken(id={self.id}, user_id={self.user_id!r}, platform={self.platform!r})"


async def fetch_page_tokens(
    conn: asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy,
    user_ids: Sequence[str],
    notification_type: str,
    platforms: Sequence[Platform] | None = None,
    *,
    cap_since: datetime | None = None,
    job_id: str = "",
) -> list[PageToken]:
    """The active tokens of ``user_ids`` (optionally of ``platforms`` only), in one query.

    With ``cap_since``, each row carries the user's low-priority sends since then by jobs
    other than ``job_id`` (the frequency cap's count); without it, 0 and no lookup."""
    return await _fetch(
        conn, PAGE_TOKENS_SQL, list(user_ids), notification_type, platforms, cap_since, job_id
    )


async def fetch_span_tokens(
    conn: asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy,
    after: str,
    last: str,
    notification_type: str,
    platforms: Sequence[Platform] | None = None,
    *,
    cap_since: datetime | None = None,
    job_id: str = "",
) -> list[PageToken]:
    """Every active token of the users in ``(after, last]`` (``""``: from the first user),
    as :func:`fetch_page_tokens` gives them for those users.

    For the pages of an ``all`` audience: such a page is exactly the users with an active
    token (of ``platforms``) in that range, so this is the same answer read as one index
    range. A user who gets a first token in the range meanwhile is included too: the
    next page starts after ``last`` and would never reach them."""
    return await _fetch(
        conn, SPAN_TOKENS_SQL, after, notification_type, platforms, cap_since, job_id, last
    )


async def _fetch(
    conn: asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy,
    sql: str,
    users: object,
    notification_type: str,
    platforms: Sequence[Platform] | None,
    cap_since: datetime | None,
    job_id: str,
    *more: object,
) -> list[PageToken]:
    """``sql`` (a form of ``_PAGE_SQL``) with its parameters in their order."""
    plats = None if platforms is None else list(platforms)
    rows = await conn.fetch(sql, users, notification_type, plats, cap_since, job_id, *more)
    make = PageToken._make
    return [make(row) for row in rows]
