"""A service's operations endpoint and what it reports: ``/metrics``, ``/healthz``, ``/readyz``.

Each consuming service (worker, cleanup, bridge) serves these on its metrics port:

- ``/healthz``: 200 while the process answers (liveness);
- ``/readyz``: 200 once the service has started, while its last broker and database
  checks passed and it is not draining after SIGTERM; else 503 with the reason
  (readiness; also the gauge ``pushfan_ready{service}``);
- ``/metrics``: the process's Prometheus registry.

The server runs in a thread of its own, so a scrape or a probe is answered even while
the event loop is busy with a broadcast. The loop side (:func:`watch`) refreshes the
checks every few seconds: the database with ``SELECT 1``, the broker by asking for the
end offsets of the partitions the consumer holds, which also gives each partition's lag
behind the group's committed offset (``pushfan_consumer_lag``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pushfan.errors import SetupError
from pushfan.logs import get_logger
from pushfan.metrics import Metrics

log = get_logger("pushfan.health")

CHECK_INTERVAL_S = 5.0
STALE_AFTER_S = 30.0  # a check not passed for this long makes the service not ready

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Health:
    """Readiness of one service, set from the event loop, read by the ops thread."""

    def __init__(self, service: str, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics
        self.started = False
        self.draining = False
        self._failing: dict[str, str] = {}  # check -> why it failed
        self._passed: dict[str, float] = {}  # check -> when it last passed
        self._publish()

    def start(self) -> None:
        self.started = True
        self._publish()

    def drain(self) -> None:
        """SIGTERM: stop taking traffic (load balancers, rollouts) while in-flight work ends."""
        self.draining = True
        self._publish()

    def passed(self, check: str) -> None:
        self._failing.pop(check, None)
        self._passed[check] = time.monotonic()
        self._publish()

    def failed(self, check: str, why: str) -> None:
        self._failing[check] = why
        self._publish()

    def state(self) -> tuple[bool, str]:
        """(ready, why not)."""
        if not self.started:
            return False, "starting"
        if self.draining:
            return False, "draining"
        if self._failing:
            return False, "; ".join(f"{k}: {v}" for k, v in sorted(self._failing.items()))
        now = time.monotonic()
        stale = sorted(k for k, at in self._passed.items() if now - at > STALE_AFTER_S)
        if stale:
            return False, f"no recent check of {', '.join(stale)}"
        return True, "ready"

    def _publish(self) -> None:
        ready, _ = self.state()
        self.metrics.child(self.metrics.ready, self.service).set(1 if ready else 0)


def _app(
    metrics: Metrics, health: Health | None
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            status, body, kind = "200 OK", b'{"status": "ok"}', "application/json"
        elif path == "/readyz":
            ready, why = health.state() if health is not None else (True, "ready")
            status = "200 OK" if ready else "503 Service Unavailable"
            body = (
                f'{{"status": "{"ready" if ready else "not_ready"}", "reason": "{why}"}}'.encode()
            )
            kind = "application/json"
        elif path in ("/metrics", "/"):
            status, body, kind = "200 OK", generate_latest(metrics.registry), CONTENT_TYPE_LATEST
        else:
            status, body, kind = "404 Not Found", b'{"error": "not found"}', "application/json"
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the service's own log


@contextlib.contextmanager
def serving(
    metrics: Metrics, port: int, setting: str, health: Health | None = None
) -> Iterator[None]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``0.0.0.0:port`` while the
    block runs; port 0: not served. A port that cannot be bound is a SetupError naming
    ``setting``, the variable that chose it."""
    if not port:
        yield
        return
    try:
        server = make_server(
            "0.0.0.0", port, _app(metrics, health), server_class=_Server, handler_class=_Quiet
        )
    except OSError as exc:
        raise SetupError(
            f"cannot serve metrics on port {port}: {exc} (set {setting} to a free port,"
            " or 0 for none)"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="pushfan-ops", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def watch(
    health: Health,
    stop: asyncio.Event,
    *,
    pool: asyncpg.Pool | None = None,
    consumer: AIOKafkaConsumer | None = None,
    group: str = "",
    interval_s: float = CHECK_INTERVAL_S,
) -> None:
    """Until ``stop``: check the database and the broker every ``interval_s``, and
    publish the consumer's lag per partition; once ``stop`` is set, the service is
    draining (not ready) while it finishes what it holds."""
    lagging: set[TopicPartition] = set()
    while not stop.is_set():
        if pool is not None:
            try:
                await pool.fetchval("SELECT 1", timeout=2)
                health.passed("database")
            except Exception as exc:
                health.failed("database", type(exc).__name__)
        if consumer is not None:
            try:
                lagging = await _lag(consumer, group, health.metrics, lagging)
                health.passed("broker")
            except Exception as exc:
                health.failed("broker", type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
    health.drain()


@contextlib.asynccontextmanager
async def watching(
    health: Health,
    stop: asyncio.Event,
    *,
    pool: asyncpg.Pool | None = None,
    consumer: AIOKafkaConsumer | None = None,
    group: str = "",
) -> AsyncIterator[None]:
    """The service has started: :func:`watch` it while the block runs."""
    health.start()
    task = asyncio.create_task(watch(health, stop, pool=pool, consumer=consumer, group=group))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _lag(
    consumer: AIOKafkaConsumer, group: str, metrics: Metrics, before: set[TopicPartition]
) -> set[TopicPartition]:
    """Set ``pushfan_consumer_lag`` for the partitions held now (end offset minus the
    group's committed offset), remove it for those no longer held; the ones set."""
    held = set(consumer.assignment())
    gauge = metrics.consumer_lag
    for tp in before - held:
        with contextlib.suppress(KeyError):
            gauge.remove(group, tp.topic, str(tp.partition))
    if held:
        async with asyncio.timeout(10):
            ends = await consumer.end_offsets(list(held))
            for tp in held:
                committed = await consumer.committed(tp)
                lag = max(0, ends[tp] - (committed or 0))
                gauge.labels(group, tp.topic, str(tp.partition)).set(lag)
    return held
