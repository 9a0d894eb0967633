"""``pushfan hygiene``: deactivate tokens unused for too long, purge long-dead rows.

A token whose latest registration (``last_seen_at``) is older than ``stale_after_days``
(default 90) is deactivated with reason ``stale``; rows deactivated more than
``purge_after_days`` ago are deleted, with their day in ``token_deliveries``. Both work
in batches (``FOR UPDATE SKIP LOCKED``), so a pass never holds many locks, two passes at
once split the work, and a registration racing a batch wins: a row that became fresh
before its lock is taken is re-checked and left alone. Run it from cron (one pass) or
with ``--loop``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from pushfan.settings import HygieneSettings

STALE_SQL = """
WITH stale AS (
    SELECT id FROM device_tokens
     WHERE is_active AND last_seen_at < now() - $1::float8 * interval '1 day'
     ORDER BY last_seen_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
)
UPDATE device_tokens AS d
   SET is_active = false, deactivated_at = now(), deactivation_reason = 'stale',
       updated_at = now()
  FROM stale WHERE d.id = stale.id
RETURNING d.id
"""

PURGE_SQL = """
WITH old AS (
    SELECT id FROM device_tokens
     WHERE NOT is_active AND deactivated_at < now() - $1::float8 * interval '1 day'
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM device_tokens AS d USING old WHERE d.id = old.id
    RETURNING d.id
), usage AS (
    DELETE FROM token_deliveries WHERE token_id IN (SELECT id FROM gone)
)
SELECT id FROM gone
"""

log = get_logger("pushfan.hygiene")


@dataclass(frozen=True, slots=True)
class Pass:
    deactivated: int
    purged: int


async def _batches(pool: asyncpg.Pool, sql: str, days: float, batch: int) -> int:
    total = 0
    while True:
        done = len(await pool.fetch(sql, days, batch))
        total += done
        if done < batch:
            return total


async def run_once(pool: asyncpg.Pool, settings: HygieneSettings, metrics: Metrics) -> Pass:
    """One pass over the table: stale tokens first, then the purge."""
    deactivated = await _batches(pool, STALE_SQL, settings.stale_after_days, settings.batch_size)
    purged = await _batches(pool, PURGE_SQL, settings.purge_after_days, settings.batch_size)
    metrics.deactivations.labels("stale").inc(deactivated)
    metrics.tokens_purged.inc(purged)
    metrics.hygiene_runs.inc()
    log.info("hygiene pass", deactivated=deactivated, purged=purged)
    return Pass(deactivated, purged)


async def run_forever(pool: asyncpg.Pool, settings: HygieneSettings, metrics: Metrics) -> None:
    """A pass every ``interval_s`` until cancelled."""
    while True:
        await run_once(pool, settings, metrics)
        await asyncio.sleep(settings.interval_s)
