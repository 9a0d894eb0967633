"""PostgreSQL access: the connection pool and the versioned schema migrations.

Migrations are the numbered ``pushfan/migrations/NNNN_name.sql`` files. ``migrate`` applies
the ones a database lacks, each in its own transaction, records them in
``schema_migrations`` with a checksum, and holds a PostgreSQL advisory lock meanwhile, so
two processes (say, two pods starting together) can run it at once: one applies, the
other waits and then finds nothing to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from pushfan.errors import SetupError
from pushfan.settings import DatabaseSettings

# pg_advisory_lock key: "pushfan\0" read as a big-endian int64, unlikely to collide.
MIGRATION_LOCK_KEY = int.from_bytes(b"pushfan\0", "big")

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The migrations shipped with this pushfan, in order; gaps or duplicates are a bug."""
    found: list[Migration] = []
    for entry in resources.files("pushfan").joinpath("migrations").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    expected = list(range(1, len(found) + 1))
    if [m.version for m in found] != expected:
        raise SetupError(f"migrations must be numbered 1..N without gaps: {found!r}")
    return found


async def migrate(dsn: str, migrations: list[Migration] | None = None) -> list[Migration]:
    """Bring the database at ``dsn`` up to date; return the migrations applied by this call.

    Raises :class:`SetupError` when an applied migration's file has changed since, or the
    database is newer than this code: both mean the deployment is inconsistent, and
    guessing would corrupt data.
    """
    wanted = load_migrations() if migrations is None else migrations
    conn = await _connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(_LEDGER_DDL)
            rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
            applied = {r["version"]: r for r in rows}
            known = {m.version: m for m in wanted}
            for version, row in sorted(applied.items()):
                mine = known.get(version)
                if mine is None:
                    raise SetupError(
                        f"the database has migration {version} ({row['name']}), which this "
                        "pushfan does not know: it is older than the schema; upgrade it"
                    )
                if mine.checksum != row["checksum"]:
                    raise SetupError(
                        f"migration {version} ({mine.name}) changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
            done: list[Migration] = []
            for m in wanted:
                if m.version in applied:
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute(m.sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum)"
                            " VALUES ($1, $2, $3)",
                            m.version,
                            m.name,
                            m.checksum,
                        )
                except asyncpg.PostgresError as exc:
                    raise SetupError(
                        f"migration {m.version} ({m.name}) failed and was rolled back: {exc}"
                    ) from exc
                done.append(m)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def schema_version(dsn: str) -> int:
    """The highest applied migration, 0 for a database never migrated."""
    conn = await _connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not exists:
            return 0
        return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
    finally:
        await conn.close()


async def _no_reset(_conn: asyncpg.Connection) -> None:
    return None


async def create_pool(settings: DatabaseSettings, *, reset: bool = True) -> asyncpg.Pool:
    """The process's connection pool; a database that cannot be reached is a SetupError.

    ``reset=False`` skips the reset query asyncpg runs on every release (a round trip
    a request, 10-25% of the registry's rate, measured); only for callers that never
    change session state (no SET, no LISTEN, no session advisory locks).
    """
    try:
        pool = await asyncpg.create_pool(
            settings.url.get_secret_value(),
            min_size=settings.min_pool_size,
            max_size=settings.max_pool_size,
            server_settings={"statement_timeout": str(settings.statement_timeout_ms)},
            reset=None if reset else _no_reset,  # None: asyncpg's own reset
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise SetupError(f"cannot reach PostgreSQL: {exc}") from exc
    assert pool is not None
    return pool


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SetupError(f"cannot reach PostgreSQL: {exc}") from exc
