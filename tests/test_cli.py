"""The `pushfan` command as an operator runs it: real processes, real broker and database."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from pushfan.stack import free_port
from schemas import NotificationJob
from worker import ledger
from worker.audience import Shard


def pushfan(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pushfan.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help_lists_every_subcommand(service_env: dict[str, str]) -> None:
    out = pushfan("--help", env=service_env)
    assert out.returncode == 0
    listed = set(re.findall(r"^    (\w+)\s", out.stdout, re.MULTILINE))
    assert listed == {
        "migrate",
        "settings",
        "up",
        "emulators",
        "registry",
        "cleanup",
        "hygiene",
        "worker",
        "status",
        "publish",
        "bridge",
    }


def test_migrate_applies_then_reports_up_to_date(
    service_env: dict[str, str], empty_database_url: str
) -> None:
    env = {**service_env, "DATABASE_URL": empty_database_url}
    first = pushfan("migrate", env=env)
    second = pushfan("migrate", env=env)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert "applied 0001_initial" in first.stdout
    assert second.stdout.strip() == "database is up to date"


def test_unreachable_database_is_one_clear_line(service_env: dict[str, str]) -> None:
    env = {**service_env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    out = pushfan("migrate", env=env)
    assert out.returncode == 2
    assert out.stderr.startswith("pushfan migrate: cannot reach PostgreSQL")
    assert "Traceback" not in out.stderr


def test_a_misspelt_setting_stops_the_command(service_env: dict[str, str]) -> None:
    out = pushfan("migrate", env={**service_env, "PUSHFAN_KAFKA__BOOTSTRAP": "x"})
    assert out.returncode == 2
    assert "PUSHFAN_KAFKA__BOOTSTRAP" in out.stderr
    assert "Traceback" not in out.stderr


def test_settings_shows_values_without_secrets(service_env: dict[str, str]) -> None:
    env = {
        **service_env,
        "DATABASE_URL": "postgresql://app:s3cret@db.internal/push",
        "PUSHFAN_KAFKA__SASL_PASSWORD": "hunter2",
    }
    out = pushfan("settings", env=env)
    assert out.returncode == 0
    assert "PUSHFAN_DATABASE__URL=postgresql://app:***@db.internal/push" in out.stdout
    assert "PUSHFAN_KAFKA__SASL_PASSWORD=***" in out.stdout
    assert "s3cret" not in out.stdout
    assert "hunter2" not in out.stdout


SUMMARY_ROW = re.compile(r"^ {4,}(\S.*?)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", re.MULTILINE)


def summary_rows(stdout: str) -> dict[str, tuple[int, int, int]]:
    """The broadcast's per-platform table: row name -> (android, ios, total)."""
    return {
        m[1].strip(): tuple(int(n.replace(",", "")) for n in m.groups()[1:])  # type: ignore[misc]
        for m in SUMMARY_ROW.finditer(stdout)
    }


def demo_population(users: int) -> dict[str, tuple[int, int]]:
    """What the demo seeds for ``users``, counted here from its rules (seed.py's
    docstring), per platform (android, ios): tokens, asleep, opted out, dead."""
    counts = {k: [0, 0] for k in ("tokens", "quiet", "opted_out", "dead")}
    for i in range(users):
        block, r = i // 10, i % 10
        platforms = [0] if r < 6 else [1] if r < 9 else [0, 1]
        group = (
            "quiet"
            if block % 10 == 0
            else "opted_out"
            if block % 20 == 5
            else "dead"
            if block % 50 == 7
            else None
        )
        for p in platforms:
            counts["tokens"][p] += 1
            if group:
                counts[group][p] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


@pytest.mark.slow
def test_up_on_the_session_stack_runs_the_demo(service_env: dict[str, str]) -> None:
    env = {
        **service_env,
        "PUSHFAN_REGISTRY__PORT": "0",
        "PUSHFAN_BRIDGE__TOPIC": f"orders-{uuid.uuid4().hex[:8]}",
    }
    out = pushfan("up", "--exit-after-demo", "--demo-users", "3000", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "applied: 0001_initial, 0002_fanout, 0003_policy, 0004_token_deliveries,"
        " 0005_token_deliveries_fillfactor" in out.stdout
    )
    assert "registered 4 devices through the registry API, logged out of one" in out.stdout
    assert re.search(
        r"the event arrived twice on orders-\w+; the bridge made job order-D\w+-shipped\n"
        r"    completed in \d+ ms: sent to 3 devices \(iphone, pixel, tablet\), once each;"
        r" the duplicate was skipped; the logged-out old phone got nothing",
        out.stdout,
    ), out.stdout

    pop = demo_population(3000)
    tokens = sum(pop["tokens"])
    assert f"segment demo-everyone: 3,000 users, {tokens:,} tokens" in out.stdout
    rows = summary_rows(out.stdout)
    expected_delivered = tuple(
        pop["tokens"][p] - pop["quiet"][p] - pop["opted_out"][p] - pop["dead"][p] for p in (0, 1)
    )
    assert rows["targeted"][:2] == pop["tokens"]
    assert rows["delivered"][:2] == expected_delivered
    # What the emulators recorded, independent of pushfan's own counters:
    assert rows["emulators received"] == rows["delivered"]
    assert rows["invalid (reported dead)"][:2] == pop["dead"]
    assert rows["cleaned up"] == rows["invalid (reported dead)"]
    assert rows["deferred (quiet hours)"][:2] == pop["quiet"]
    assert rows["suppressed (opted out)"][:2] == pop["opted_out"]
    assert min(pop["dead"] + pop["quiet"] + pop["opted_out"]) > 0  # every group is exercised
    assert "every token accounted for" in out.stdout
    assert "MISMATCH" not in out.stdout

    assert "Kafka broker (external)" in out.stdout
    assert re.search(r"registry API: +http://127\.0\.0\.1:\d+/v1/devices", out.stdout)
    assert re.search(r"its docs: +http://127\.0\.0\.1:\d+/docs", out.stdout)
    assert re.search(r"FCM v1 emulator: +https://127\.0\.0\.1:\d+/v1/projects/", out.stdout)
    assert re.search(r"APNs emulator: +https://127\.0\.0\.1:\d+/3/device/", out.stdout)
    assert out.stdout.rstrip().endswith("pushfan up: stopped")


@pytest.mark.slow
def test_up_on_a_fresh_machine_starts_its_own_stack() -> None:
    # No broker or database given: the embedded ones must start, serve and stop.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PUSHFAN_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
    }
    env.update(
        PUSHFAN_LOGGING__FORMAT="json",
        PUSHFAN_WORKER__METRICS_PORT="0",
        PUSHFAN_REGISTRY__PORT="0",
    )
    out = pushfan("up", "--exit-after-demo", "--demo-users", "500", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sent to 3 devices (iphone, pixel, tablet), once each" in out.stdout
    assert "every token accounted for" in out.stdout
    assert "Kafka broker (tansu)" in out.stdout or "Kafka broker (testcontainers)" in out.stdout
    assert "PostgreSQL (embedded)" in out.stdout or "PostgreSQL (testcontainers)" in out.stdout


async def test_status_shows_a_broadcasts_progress_and_counts(
    service_env: dict[str, str], db: asyncpg.Pool
) -> None:
    job = NotificationJob.model_validate(
        {
            "job_id": f"status-{uuid.uuid4().hex[:8]}",
            "type": "news",
            "audience": {"kind": "segment", "segment": "everyone"},
            "payload": {"title": "Hello"},
            "created_at": datetime.now(UTC),
        }
    )
    await ledger.begin(db, job)
    shards = [Shard(0, None, "m", 3_000), Shard(1, "m", None, 1_000)]
    await ledger.create_shards(db, job.job_id, shards)
    claimed = await ledger.claim(db, job.job_id, 0, "me")
    assert claimed is not None
    counts = ledger.Counts(users=1_000, targeted={"android": 1_500, "ios": 400}, sent=1_890)
    counts.invalid, counts.parked = 7, 3
    assert await ledger.report_page(db, job.job_id, 0, "me", "f", counts, [])

    out = pushfan("status", job.job_id, env=service_env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"job {job.job_id} (news, segment): running"
    assert lines[1] == "  [" + "#" * 8 + "." * 22 + "]  25%  1,000 / 4,000 users   shards 0/2"
    assert lines[2] == "  targeted   1,900 (android 1,500, ios 400)"
    assert "sent 1,890  invalid 7  failed 0" in lines[3]
    assert "retrying 3" in lines[3]

    as_json = pushfan("status", "--json", job.job_id, env=service_env)
    assert json.loads(as_json.stdout)["progress"] == 0.25

    missing = pushfan("status", "no-such-job", env=service_env)
    assert missing.returncode == 1
    assert "no job 'no-such-job'" in missing.stderr


def test_the_registry_stops_cleanly_on_sigterm(service_env: dict[str, str]) -> None:
    env = {
        **service_env,
        "PUSHFAN_REGISTRY__PORT": str(free_port()),
        "PUSHFAN_REGISTRY__JWT_SECRET": "a-test-secret-of-thirty-two-bytes!",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pushfan.cli", "registry"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("pushfan registry serving on http://"), line
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    # uvicorn used to re-raise SIGTERM after its shutdown: exit 143, a traceback, and
    # the database pool never closed.
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "never retrieved" not in stderr
