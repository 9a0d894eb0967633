"""``pushfan registry``: the API on uvicorn, with its database pool and metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn

from pushfan.db import create_pool
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from pushfan.signals import stop_on_signals
from registry.api import RegistryApp


@dataclass(frozen=True)
class Served:
    url: str
    stopped: asyncio.Task[None]  # ends when uvicorn has shut down
    app: RegistryApp


class _Server(uvicorn.Server):
    """uvicorn without its signal capture: it would re-raise SIGTERM after shutting down,
    past the pool's close (our caller stops it on the signal instead)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, port: int | None = None, metrics: Metrics | None = None
) -> AsyncIterator[Served]:
    """Serve the registry until the block ends (or uvicorn stops on SIGTERM/SIGINT,
    finishing in-flight requests). Used by the CLI, the tests and the benchmark
    (``port=0`` picks a free port). ``metrics``: the process's, when it runs other
    services too (``pushfan up``)."""
    # The registry keeps no session state (its advisory locks are transaction-scoped).
    pool = await create_pool(settings.database, reset=False)
    app = RegistryApp(settings.registry, pool, metrics or Metrics())
    config = uvicorn.Config(
        app,
        host=settings.registry.host,
        port=settings.registry.port if port is None else port,
        loop="none",  # the running loop (uvloop where the CLI installed it)
        http="httptools",
        lifespan="off",
        access_log=False,  # our own metrics count requests; URLs stay out of logs
        # Nothing reads the client address or scheme, so X-Forwarded-* rewriting would
        # be an ASGI layer per request for nothing (1.4% of a registration's instructions).
        proxy_headers=False,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start (e.g. the port is taken)
                raise RuntimeError("registry server stopped before it started")
            await asyncio.sleep(0.01)
        sockets = server.servers[0].sockets
        host, bound = sockets[0].getsockname()[:2]
        yield Served(f"http://{host}:{bound}", task, app)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await app.close()  # the pool's close waits for the connections it keeps
        finally:
            await pool.close()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT: in-flight requests finish, then the pool closes."""
    stop = stop_on_signals()
    async with running(settings) as served:
        url = served.url
        print(
            f"pushfan registry serving on {url} (API docs: {url}/docs,"
            f" OpenAPI: {url}/openapi.json)",
            flush=True,
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, served.stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
