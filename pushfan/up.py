"""``pushfan up`` (``make run``): the whole system on embedded defaults, and a demo.

It starts the infrastructure (a Kafka-protocol broker and PostgreSQL, see
:mod:`pushfan.stack`) and the FCM and APNs emulators, applies the migrations, creates
the topics, runs every service in this process (the registry API, a fanout worker
sending to the emulators, the cleanup consumer, the orders-shipped bridge), and runs
the demo of :mod:`pushfan.demo` through them. They keep serving until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

import jwt
from pydantic import SecretStr

from pushfan.db import create_pool, migrate
from pushfan.demo.scenario import Demo, run_demo
from pushfan.emulators.runner import SERVING, Emulators, describe, start_emulators
from pushfan.errors import SetupError
from pushfan.kafka import ensure_topics
from pushfan.metrics import Metrics
from pushfan.settings import Settings
from pushfan.signals import wait_for_stop_signal
from pushfan.stack import Stack, redact_url, start_stack


def run_up(settings: Settings, *, exit_after_demo: bool, demo_users: int = 20_000) -> int:
    """Start the stack, run the demo, serve until SIGINT/SIGTERM (or not), stop cleanly."""
    print("pushfan up: starting the embedded stack ...", flush=True)
    # The libraries narrate connections, rebalances and requests at INFO; keep the demo readable.
    if settings.logging.level == "INFO":
        for name in ("aiokafka", "httpx", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # Started from the main thread: the broker process is tied to the thread that spawned it.
    stack = start_stack(settings, purpose="pushfan")
    try:
        return asyncio.run(_up(stack.apply(settings), stack, exit_after_demo, demo_users))
    finally:
        stack.close()
        print("pushfan up: stopped", flush=True)


async def _up(settings: Settings, stack: Stack, exit_after_demo: bool, demo_users: int) -> int:
    applied = await migrate(settings.database.url.get_secret_value())
    # The business topic belongs to the fulfilment system in production; here we are it.
    created = await ensure_topics(settings.kafka, also=(settings.bridge.topic,))
    print(f"  migrations applied: {', '.join(f'{m.version:04d}_{m.name}' for m in applied) or '-'}")
    print(f"  topics created:     {', '.join(created) or '-'}")
    emulators = await start_emulators()
    try:
        settings, mint, minted_secret = _registry_auth(emulators.apply(settings))
        return await _serve(
            settings, stack, emulators, mint, minted_secret, exit_after_demo, demo_users
        )
    finally:
        await emulators.stop()


async def _serve(
    settings: Settings,
    stack: Stack,
    emulators: Emulators,
    mint: Callable[[str], str] | None,
    minted_secret: bool,
    exit_after_demo: bool,
    demo_users: int,
) -> int:
    """Every service in this process on one metrics registry, the demo, then serving."""
    from producer.bridge import run as run_bridge
    from registry.cleanup import run as run_cleanup
    from registry.server import running as registry_running
    from worker.main import run as run_worker

    metrics = Metrics()  # one process, one registry: every service's metrics together
    # ... served once, on the worker's port; the others' ports stay closed.
    settings = settings.model_copy(
        update={
            "bridge": settings.bridge.model_copy(update={"metrics_port": 0}),
            "hygiene": settings.hygiene.model_copy(update={"cleanup_metrics_port": 0}),
        }
    )
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as exits:
        pool = await create_pool(settings.database)
        exits.push_async_callback(pool.close)
        registry = await exits.enter_async_context(registry_running(settings, metrics=metrics))
        services = {
            "worker": asyncio.create_task(run_worker(settings, stop, metrics)),
            "cleanup": asyncio.create_task(run_cleanup(settings, pool, metrics, stop)),
            "bridge": asyncio.create_task(run_bridge(settings, metrics, stop)),
        }
        try:
            topics = settings.kafka.topics
            print(
                f"  services: registry API on {registry.url}, worker ({topics.jobs}), cleanup"
                f" ({topics.invalid_tokens}), bridge ({settings.bridge.topic} -> {topics.jobs})",
                flush=True,
            )
            demo = Demo(settings, emulators, pool, registry.url, metrics, mint)
            running = asyncio.create_task(run_demo(demo, users=demo_users))
            await asyncio.wait({running, *services.values()}, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                running.cancel()
                for name, task in services.items():
                    if task.done():
                        task.result()  # why it stopped, if it raised
                        raise SetupError(f"the {name} stopped before the demo was done")
            if not running.result():
                print("pushfan up: the demo did not deliver what it should", flush=True)
                return 1
            _print_where(settings, stack, registry.url, mint if minted_secret else None)
            print(describe(emulators), flush=True)
            if exit_after_demo:
                return 0
            print(f"\n{SERVING}", flush=True)
            stopped = asyncio.create_task(wait_for_stop_signal())
            await asyncio.wait({stopped, *services.values()}, return_when=asyncio.FIRST_COMPLETED)
            return 0 if stopped.done() else 1
        finally:
            stop.set()
            for task in services.values():
                with contextlib.suppress(Exception):
                    await task


def _registry_auth(settings: Settings) -> tuple[Settings, Callable[[str], str] | None, bool]:
    """Settings whose registry can verify tokens the demo mints: the configured HS256
    secret, or one made up for this run. Returns (settings, mint(user_id) -> bearer
    token or None under RS256, whether the secret was made up here)."""
    r = settings.registry
    if r.jwt_algorithm != "HS256":
        return settings, None, False
    made_up = r.jwt_secret is None
    secret = secrets.token_urlsafe(32) if r.jwt_secret is None else r.jwt_secret.get_secret_value()
    if made_up:
        registry = r.model_copy(update={"jwt_secret": SecretStr(secret)})
        settings = settings.model_copy(update={"registry": registry})

    def mint(user_id: str) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "iss": r.jwt_issuer, "aud": r.jwt_audience}
        return jwt.encode({**claims, "iat": now, "exp": now + 86_400}, secret, algorithm="HS256")

    return settings, mint, made_up


def _metrics_url(settings: Settings) -> str:
    port = settings.worker.metrics_port
    return f"http://127.0.0.1:{port}/metrics" if port else "not served (metrics_port 0)"


def _print_where(
    settings: Settings, stack: Stack, registry_url: str, mint: Callable[[str], str] | None
) -> None:
    db = settings.database.url.get_secret_value()
    topics = settings.kafka.topics
    rows = [
        (f"Kafka broker ({stack.broker.kind})", stack.broker.bootstrap_servers),
        (f"PostgreSQL ({stack.database.kind})", redact_url(db)),
        ("registry API", f"{registry_url}/v1/devices"),
        ("  its docs", f"{registry_url}/docs (OpenAPI: {registry_url}/openapi.json)"),
        ("metrics (every service)", f"{_metrics_url(settings)}, {registry_url}/metrics"),
        ("jobs topic", topics.jobs),
        ("order events topic", settings.bridge.topic),
        ("dead letters topic", topics.dead_letter),
    ]
    width = max(len(name) for name, _ in rows) + 1
    text = "\nEverything is here:\n" + "".join(
        f"  {name + ':':<{width}} {value}\n" for name, value in rows
    )
    if mint is not None:
        text += (
            "Try the registry as user 42 (a secret made up for this run; set"
            " PUSHFAN_REGISTRY__JWT_SECRET to choose one):\n"
            f"  curl -H 'Authorization: Bearer {mint('42')}' {registry_url}/v1/devices\n"
        )
    print(
        text + "Point other pushfan commands at it with:\n"
        f"  export KAFKA_BOOTSTRAP_SERVERS={stack.broker.bootstrap_servers}\n"
        f"  export DATABASE_URL='{redact_url(db)}'\n"
        "then publish with `pushfan publish` and follow a job with `pushfan status JOB_ID`.\n"
        "Platform emulators (scriptable; see pushfan/emulators/script.py):",
        flush=True,
    )
