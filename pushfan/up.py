"""``pushfan up`` (``make run``): the whole system on embedded defaults, and a demo.

It starts the infrastructure (a Kafka-protocol broker and PostgreSQL, see
:mod:`pushfan.stack`) and the FCM and APNs emulators, applies the migrations, creates
the topics, runs a fanout worker sending to the emulators, and runs the demo of
:mod:`pushfan.demo` through it. The worker keeps serving until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from pushfan.db import migrate
from pushfan.emulators.runner import SERVING, describe, start_emulators
from pushfan.kafka import ensure_topics
from pushfan.settings import Settings
from pushfan.stack import Stack, redact_url, start_stack


def run_up(settings: Settings, *, exit_after_demo: bool, demo_users: int = 20_000) -> int:
    """Start the stack, run the demo, serve until SIGINT/SIGTERM (or not), stop cleanly."""
    print("pushfan up: starting the embedded stack ...", flush=True)
    # The client libraries narrate connections and rebalances at INFO; keep the demo readable.
    if settings.logging.level == "INFO":
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # Started from the main thread: the broker process is tied to the thread that spawned it.
    stack = start_stack(settings, purpose="pushfan")
    try:
        return asyncio.run(_up(stack.apply(settings), stack, exit_after_demo, demo_users))
    finally:
        stack.close()
        print("pushfan up: stopped", flush=True)


async def _up(settings: Settings, stack: Stack, exit_after_demo: bool, demo_users: int) -> int:
    from pushfan.demo import run_demo
    from worker.main import run as run_worker

    applied = await migrate(settings.database.url.get_secret_value())
    created = await ensure_topics(settings.kafka)
    print(f"  migrations applied: {', '.join(f'{m.version:04d}_{m.name}' for m in applied) or '-'}")
    print(f"  topics created:     {', '.join(created) or '-'}")
    emulators = await start_emulators()
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(emulators.apply(settings), stop))
    try:
        print(f"  worker: consuming {settings.kafka.topics.jobs}, sending to the emulators")
        demo = asyncio.create_task(run_demo(settings, emulators, users=demo_users))
        await asyncio.wait({demo, worker}, return_when=asyncio.FIRST_COMPLETED)
        if worker.done():
            demo.cancel()
            worker.result()  # the worker's start-up error, if that is what ended it
            return 1
        if not demo.result():
            print("pushfan up: the demo did not deliver what it should", flush=True)
            return 1
        _print_where(settings, stack)
        print(describe(emulators), flush=True)
        if exit_after_demo:
            return 0
        print(f"\n{SERVING}", flush=True)
        await wait_for_stop_signal()
        return 0
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await worker
        await emulators.stop()


def _metrics_url(settings: Settings) -> str:
    port = settings.worker.metrics_port
    return f"http://127.0.0.1:{port}/metrics" if port else "not served (metrics_port 0)"


def _print_where(settings: Settings, stack: Stack) -> None:
    db = settings.database.url.get_secret_value()
    rows = [
        (f"Kafka broker ({stack.broker.kind})", stack.broker.bootstrap_servers),
        (f"PostgreSQL ({stack.database.kind})", redact_url(db)),
        ("jobs topic", settings.kafka.topics.jobs),
        ("worker metrics", _metrics_url(settings)),
    ]
    width = max(len(name) for name, _ in rows) + 1
    print(
        "\nEverything is here:\n"
        + "".join(f"  {name + ':':<{width}} {value}\n" for name, value in rows)
        + "Point other pushfan commands at it with:\n"
        f"  export KAFKA_BOOTSTRAP_SERVERS={stack.broker.bootstrap_servers}\n"
        f"  export DATABASE_URL='{redact_url(db)}'\n"
        "and follow a job with `pushfan status JOB_ID`.\n"
        "Platform emulators (scriptable; see pushfan/emulators/script.py):",
        flush=True,
    )


async def wait_for_stop_signal() -> None:
    """Return once SIGINT or SIGTERM arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
