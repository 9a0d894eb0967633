"""Resolve stage: a job's audience as pages of user_ids, and its split into shards.

Pages are read by keyset (``user_id > last``), never OFFSET, so page n costs what page 1
costs. A range is ``(after, until]`` in user_id order; ``None`` means unbounded, so the
shards of a split cover every user_id, including users who get a token while the
broadcast runs. Segment and "all" audiences are ordered by the database's collation, a
``users`` list by Python's string order: each audience is compared in one place only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from schemas import (
    NotificationJob,
    SegmentAudience,
    UserAudience,
    UsersAudience,
)


def _query(
    job: NotificationJob, after: str, until: str | None, limit: int
) -> tuple[str, list[object]]:
    """The page statement for ``job``'s audience and its arguments.

    One statement per shape, numbered to its arguments: with an ``OR $n IS NULL`` in it,
    a generic plan could no longer seek the index to the cursor and would rescan the
    audience from its start on every page."""
    args: list[object] = [after]
    audience = job.audience
    if isinstance(audience, SegmentAudience):
        args.append(audience.segment)
        sql = "SELECT user_id FROM segment_members WHERE segment = $2 AND user_id > $1"
    else:
        # DISTINCT over the partial index (user_id leading) is a Unique over an
        # index-only scan: no sort, no hash.
        sql = "SELECT DISTINCT user_id FROM device_tokens WHERE is_active AND user_id > $1"
        if job.platforms is not None:
            args.append(list(job.platforms))
            sql += f" AND platform = ANY(${len(args)}::text[])"
    if until is not None:
        args.append(until)
        sql += f" AND user_id <= ${len(args)}"
    args.append(limit)
    return f"{sql} ORDER BY user_id LIMIT ${len(args)}", args


def listed_ids(job: NotificationJob) -> list[str] | None:
    """The user_ids a ``user`` or ``users`` audience names, sorted; None for the others."""
    audience = job.audience
    if isinstance(audience, UserAudience):
        return [audience.user_id]
    if isinstance(audience, UsersAudience):
        return sorted(audience.user_ids)
    return None


async def pages(
    db: asyncpg.Pool | asyncpg.Connection,
    job: NotificationJob,
    *,
    after: str | None,
    until: str | None,
    page_size: int,
) -> AsyncIterator[list[str]]:
    """The audience's user_ids in ``(after, until]``, ``page_size`` at a time, in order."""
    listed = listed_ids(job)
    if listed is not None:
        chosen = [
            u for u in listed if (after is None or u > after) and (until is None or u <= until)
        ]
        for i in range(0, len(chosen), page_size):
            yield chosen[i : i + page_size]
        return
    cursor = after or ""  # user_ids are never empty, so "" is below every one of them
    while True:
        sql, args = _query(job, cursor, until, page_size)
        page = [row[0] for row in await db.fetch(sql, *args)]
        if not page:
            return
        yield page
        if len(page) < page_size:
            return
        cursor = page[-1]


@dataclass(frozen=True, slots=True)
class Shard:
    """``(after, until]`` holding ``users`` users of the audience when it was split."""

    shard_no: int
    after: str | None
    until: str | None
    users: int


async def split(
    db: asyncpg.Pool | asyncpg.Connection, job: NotificationJob, shard_users: int
) -> list[Shard]:
    """Cut the audience into consecutive shards of ``shard_users`` users; the first is
    unbounded below and the last above. One pass over the audience's index."""
    listed = listed_ids(job)
    if listed is not None:
        chunks = [listed[i : i + shard_users] for i in range(0, len(listed), shard_users)]
        last = len(chunks) - 1
        return [
            Shard(n, None if n == 0 else chunks[n - 1][-1], None if n == last else c[-1], len(c))
            for n, c in enumerate(chunks)
        ]
    shards: list[Shard] = []
    after = ""
    while True:
        sql, args = _query(job, after, None, shard_users)
        row = await db.fetchrow(f"SELECT max(user_id), count(*) FROM ({sql}) s", *args)
        assert row is not None
        until, count = row[0], int(row[1])
        if count < shard_users:
            if count or not shards:
                shards.append(Shard(len(shards), after or None, None, count))
            else:  # the previous shard ended at the audience's end: open it above
                prev = shards[-1]
                shards[-1] = Shard(prev.shard_no, prev.after, None, prev.users)
            return shards
        shards.append(Shard(len(shards), after or None, until, count))
        after = until


def shard_job(job: NotificationJob, shard: Shard) -> NotificationJob:
    """The job as a shard message carries it: a ``users`` list cut down to the shard."""
    if not isinstance(job.audience, UsersAudience):
        return job
    ids = [
        u
        for u in job.audience.user_ids
        if (shard.after is None or u > shard.after) and (shard.until is None or u <= shard.until)
    ]
    return job.model_copy(update={"audience": UsersAudience(user_ids=ids)})


__all__ = ["Shard", "listed_ids", "pages", "shard_job", "split"]
