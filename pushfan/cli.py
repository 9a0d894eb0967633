"""The ``pushfan`` command: one entry point, one subcommand per service or task.

Settings are built once here from the environment and passed down; a bad setting or an
unreachable dependency at start-up ends the command with a one-line message and exit
status 2 rather than a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from producer import cli as publish_cli
from pushfan import __version__
from pushfan.emulators.credentials import DEFAULT_STATE_DIR
from pushfan.errors import SetupError
from pushfan.logs import configure_logging
from pushfan.settings import Settings, env_names, load_settings
from pushfan.signals import stop_on_signals
from schemas import format_validation_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushfan",
        description="Push-notification fanout: Kafka jobs to every device via FCM and APNs. "
        "Configuration comes from PUSHFAN_* environment variables (see `pushfan settings`).",
    )
    parser.add_argument("--version", action="version", version=f"pushfan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="apply the database migrations (safe to run concurrently)")
    p.set_defaults(run=_cmd_migrate)

    p = sub.add_parser("settings", help="list every setting, its variable and current value")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (for docs)")
    p.set_defaults(run=_cmd_settings)

    p = sub.add_parser(
        "up",
        help="start the embedded stack and every service, run the demo (`make run`)",
        description="Start a Kafka-protocol broker and a PostgreSQL (or use KAFKA_BOOTSTRAP_SERVERS"
        " and DATABASE_URL), apply migrations, create the topics, start the FCM and APNs"
        " emulators and every service in this process: the registry API"
        " (PUSHFAN_REGISTRY__PORT; a JWT secret is made up unless PUSHFAN_REGISTRY__JWT_SECRET"
        " is set), a fanout worker sending to the emulators, the cleanup consumer and the"
        " orders-shipped bridge. Then run the demo: user 42 registers devices through the API,"
        " an order-shipped event arrives twice and is notified once, and a broadcast to a"
        " seeded segment (quiet hours, opt-outs, dead tokens) is accounted for per platform."
        " Keeps serving until Ctrl-C.",
    )
    p.add_argument("--exit-after-demo", action="store_true", help="stop once the demo is done")
    p.add_argument(
        "--demo-users",
        type=int,
        default=20_000,
        metavar="N",
        help="users in the demo broadcast's segment (default 20000; 1.1 devices each)",
    )
    p.set_defaults(run=_cmd_up)

    p = sub.add_parser(
        "emulators",
        help="serve the FCM and APNs emulators until Ctrl-C",
        description="Serve FCM HTTP v1 and APNs emulators over HTTP/2 with TLS, with key"
        " material (local CA, FCM service account, APNs .p8 key) created on first start.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--fcm-port", type=int, default=8443, help="FCM port (0: any free port)")
    p.add_argument("--apns-port", type=int, default=8444, help="APNs port (0: any free port)")
    p.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where key material lives"
    )
    p.set_defaults(run=_cmd_emulators)

    p = sub.add_parser(
        "registry",
        help="serve the token registry HTTP API (devices, preferences) until SIGTERM",
        description="Serve the token registry API on PUSHFAN_REGISTRY__HOST:PORT with bearer"
        " JWT auth (PUSHFAN_REGISTRY__JWT_*). The OpenAPI document is at /openapi.json"
        " (as an HTML page at /docs), Prometheus metrics at /metrics. Run `pushfan migrate`"
        " first.",
    )
    p.set_defaults(run=_cmd_registry)

    p = sub.add_parser(
        "cleanup",
        help="deactivate tokens the platforms reported dead (consumes invalid-token events)",
        description="Consume the invalid-token topic in batches, deactivate each batch in one"
        " statement (a token registered again since the report is kept), commit offsets after"
        " the database write. Runs until SIGTERM; the current batch finishes first. /metrics,"
        " /healthz and /readyz on PUSHFAN_HYGIENE__CLEANUP_METRICS_PORT.",
    )
    p.set_defaults(run=_cmd_cleanup)

    p = sub.add_parser(
        "hygiene",
        help="deactivate tokens unused for PUSHFAN_HYGIENE__STALE_AFTER_DAYS, purge old rows",
        description="One pass (for cron), or one every PUSHFAN_HYGIENE__INTERVAL_S with --loop:"
        " deactivate tokens not registered again for stale_after_days (default 90), delete"
        " rows deactivated more than purge_after_days ago (default 30).",
    )
    p.add_argument("--loop", action="store_true", help="keep running, a pass every interval")
    p.set_defaults(run=_cmd_hygiene)

    p = sub.add_parser(
        "worker",
        help="consume notification jobs and fan them out to every device (until SIGTERM)",
        description="Consume the jobs, shards and retry topics in the group"
        " PUSHFAN_WORKER__GROUP_ID: resolve each job's audience page by page, send through FCM"
        " and APNs, report invalid tokens and parked retries, record progress in the job"
        " ledger, then commit. Users' preferences apply: opted-out types are suppressed,"
        " users inside quiet hours are deferred and released by the scheduler every worker"
        " runs (PUSHFAN_WORKER__RELEASE_INTERVAL_S), low-priority jobs obey"
        " PUSHFAN_WORKER__LOW_CAP; urgent jobs bypass all of it. Run several for more"
        " throughput: big audiences are split into shards that every worker of the group"
        " takes a share of. SIGTERM stops between pages. /metrics, /healthz and /readyz on"
        " PUSHFAN_WORKER__METRICS_PORT. Run `pushfan migrate` first.",
    )
    p.set_defaults(run=_cmd_worker)

    p = sub.add_parser(
        "status",
        help="show a job's progress and counts from the job ledger",
        description="Print a job's state, a progress bar while a broadcast runs, and its"
        " counts (targeted per platform, sent, invalid, failed, suppressed, capped,"
        " retrying, expired; deferred by quiet hours, released, users still waiting). Exit"
        " status 1 if the ledger has no such job.",
    )
    p.add_argument("job_id", metavar="JOB_ID", help="the job's job_id")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="print again every SECONDS until the job is finished",
    )
    p.set_defaults(run=_cmd_status)

    publish_cli.add_parser(sub)

    p = sub.add_parser(
        "bridge",
        help="turn business events (orders shipped) into notification jobs (until SIGTERM)",
        description="Bridges from an existing event stream to notification jobs, without"
        " changing the system that produces it.",
    )
    bridges = p.add_subparsers(dest="bridge", required=True, metavar="BRIDGE")
    b = bridges.add_parser(
        "orders-shipped",
        help="order-shipped events to a notification for the order's user",
        description="Consume order-shipped events (JSON: order_id, user_id, optional"
        " carrier and tracking_url) from PUSHFAN_BRIDGE__TOPIC in the group"
        " PUSHFAN_BRIDGE__GROUP_ID and publish one job per event to the jobs topic, id"
        " order-<order_id>-shipped, so an event delivered twice notifies once. Title and"
        " body come from PUSHFAN_BRIDGE__TITLE and PUSHFAN_BRIDGE__BODY ({order_id},"
        " {user_id}, {carrier}, {tracking_url}); type, priority and expiry from"
        " PUSHFAN_BRIDGE__NOTIFICATION_TYPE, __PRIORITY and __TTL_S. An event that is not"
        " JSON or breaks the contract goes to the dead-letter topic with the reason."
        " Offsets are committed once the broker has acknowledged the batch's jobs. The"
        " topic belongs to the fulfilment system: the bridge never creates it, and waits"
        " (with a warning) while it is missing. SIGTERM finishes the current batch."
        " /metrics, /healthz and /readyz on PUSHFAN_BRIDGE__METRICS_PORT (0: not served).",
    )
    b.set_defaults(run=_cmd_bridge)
    return parser


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks stop what was started.

    Long-running commands install their own graceful handler on top of this one.
    """

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    try:
        settings = load_settings()
    except (ValidationError, ValueError) as exc:
        # One line, without the values (they can be secrets): format_validation_error.
        reason = format_validation_error(exc) if isinstance(exc, ValidationError) else exc
        print(f"pushfan: invalid settings: {reason}", file=sys.stderr)
        return 2
    configure_logging(settings.logging)
    run: Callable[[argparse.Namespace, Settings], int] = args.run
    try:
        return run(args, settings)
    except SetupError as exc:
        print(f"pushfan {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from pushfan.db import migrate

    applied = asyncio.run(migrate(settings.database.url.get_secret_value()))
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("database is up to date")
    return 0


def _cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    current = _flatten(settings.model_dump())
    if args.markdown:
        print("| variable | default | meaning |")
        print("| --- | --- | --- |")
    for name, field in env_names():
        default = "" if field.default is None else _show(field.default)
        if args.markdown:
            print(f"| `{name}` | `{default}` | {field.description or ''} |")
        else:
            print(f"{name}={_show(current[name])}")
    return 0


def _flatten(values: dict[str, object], prefix: str = "PUSHFAN_") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key.upper()}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}__"))
        else:
            out[name] = value
    return out


def _show(value: object) -> str:
    from pydantic import SecretStr

    from pushfan.stack import redact_url

    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return redact_url(secret) if "://" in secret else "***"
    return "" if value is None else str(value)


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from pushfan.up import run_up

    return run_up(settings, exit_after_demo=args.exit_after_demo, demo_users=args.demo_users)


def _cmd_emulators(args: argparse.Namespace, _settings: Settings) -> int:
    from pushfan.emulators.runner import SERVING, describe, start_emulators
    from pushfan.signals import wait_for_stop_signal

    async def serve() -> None:
        emulators = await start_emulators(
            args.state_dir, host=args.host, fcm_port=args.fcm_port, apns_port=args.apns_port
        )
        try:
            print(describe(emulators), flush=True)
            print(f"\n{SERVING}", flush=True)
            await wait_for_stop_signal()
        finally:
            await emulators.stop()

    try:
        asyncio.run(serve())
    except OSError as exc:
        raise SetupError(f"cannot listen: {exc}") from exc
    return 0


def _cmd_registry(_args: argparse.Namespace, settings: Settings) -> int:
    from registry.server import serve

    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        raise SetupError(f"cannot listen: {exc}") from exc
    return 0


def _cmd_cleanup(_args: argparse.Namespace, settings: Settings) -> int:
    from pushfan.db import create_pool
    from pushfan.metrics import Metrics
    from registry.cleanup import run

    async def main() -> None:
        stop = stop_on_signals()
        pool = await create_pool(settings.database)
        try:
            print("pushfan cleanup: consuming", settings.kafka.topics.invalid_tokens, flush=True)
            await run(settings, pool, Metrics(), stop)
        finally:
            await pool.close()

    asyncio.run(main())
    return 0


def _cmd_hygiene(args: argparse.Namespace, settings: Settings) -> int:
    from pushfan.db import create_pool
    from pushfan.metrics import Metrics
    from registry.hygiene import run_forever, run_once

    async def main() -> None:
        pool = await create_pool(settings.database)
        try:
            if args.loop:
                await run_forever(pool, settings.hygiene, Metrics())
            else:
                done = await run_once(pool, settings.hygiene, Metrics())
                print(f"deactivated {done.deactivated} stale tokens, purged {done.purged} rows")
        finally:
            await pool.close()

    asyncio.run(main())
    return 0


def _cmd_worker(_args: argparse.Namespace, settings: Settings) -> int:
    from worker.main import run

    async def main() -> None:
        stop = stop_on_signals()
        print("pushfan worker: consuming", settings.kafka.topics.jobs, flush=True)
        await run(settings, stop)

    _run_fast(main())
    return 0


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """``main`` on uvloop where it is installed (a dependency on every platform it
    supports): its TLS and sockets cost the worker less per request than asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _cmd_bridge(_args: argparse.Namespace, settings: Settings) -> int:
    from producer.bridge import run
    from pushfan.metrics import Metrics

    topic, jobs = settings.bridge.topic, settings.kafka.topics.jobs

    def started(_topic_exists: bool) -> None:
        # A missing topic is the bridge's own warning, in the log (once).
        print(f"pushfan bridge: {topic} -> {jobs}", flush=True)

    async def main() -> None:
        stop = stop_on_signals()
        await run(settings, Metrics(), stop, on_start=started)

    asyncio.run(main())
    return 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from pushfan.db import create_pool
    from worker import ledger
    from worker.status import JobStatus, as_json, render, status

    async def fetch() -> JobStatus | None:
        pool = await create_pool(settings.database.model_copy(update={"min_pool_size": 1}))
        try:
            return await status(pool, args.job_id)
        finally:
            await pool.close()

    while True:
        found = asyncio.run(fetch())
        if found is None:
            print(f"pushfan status: no job {args.job_id!r} in the ledger", file=sys.stderr)
            return 1
        print(as_json(found) if args.json else render(found), flush=True)
        if not args.watch or found.state in ledger.FINAL_STATES:
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
