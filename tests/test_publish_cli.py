"""``pushfan publish`` as a person or a script runs it: a real process, the real broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from pushfan.settings import Settings, subprocess_env
from schemas import decode_job
from tests.worker_harness import Record, own_topics, read_records


@pytest.fixture
async def psettings(settings: Settings) -> Settings:
    return await own_topics(settings)


def publish(settings: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pushfan.cli", "publish", *args],
        env=subprocess_env(settings),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def on_topic(settings: Settings) -> list[Record]:
    """Everything on the jobs topic now."""
    return await read_records(settings, settings.kafka.topics.jobs)


async def test_publish_to_a_user_with_data(psettings: Settings) -> None:
    out = await asyncio.to_thread(
        publish,
        psettings,
        "user",
        "42",
        "--type=order_shipped",
        "--title=Your order has shipped",
        "--body=Order 123 is on its way.",
        "--data=order_id=123",
        "--data=tracking=https://t.example/1?a=b",
        "--job-id=order-123-shipped",
    )

    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["order-123-shipped"]
    (record,) = await on_topic(psettings)
    job = decode_job(record.value or b"")
    assert record.key == b"user:42"
    assert job.audience.kind == "user"
    assert job.payload.data == {"order_id": "123", "tracking": "https://t.example/1?a=b"}
    assert job.expires_at is not None


async def test_a_broadcast_dry_run_to_one_platform(psettings: Settings) -> None:
    out = await asyncio.to_thread(
        publish,
        psettings,
        "broadcast",
        "--segment=vip",
        "--type=marketing",
        "--title=Spring sale",
        "--priority=low",
        "--platform=ios",
        "--dry-run",
        "--ttl=0",
    )

    assert out.returncode == 0, out.stderr
    (record,) = await on_topic(psettings)
    job = decode_job(record.value or b"")
    assert (job.audience.kind, job.dry_run, job.platforms, job.priority) == (
        "segment",
        True,
        ("ios",),
        "low",
    )
    assert job.expires_at is None
    assert record.key == job.job_id.encode()


async def test_jobs_as_json_lines_from_stdin(psettings: Settings) -> None:
    now = datetime.now(UTC).isoformat()
    lines = [
        {
            "job_id": f"stdin-{i}",
            "type": "news",
            "audience": {"kind": "all"},
            "payload": {"title": f"news {i}"},
            "created_at": now,
        }
        for i in range(2)
    ]
    stdin = "\n".join(json.dumps(line) for line in lines) + "\n"

    out = await asyncio.to_thread(publish, psettings, "json", stdin=stdin)

    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["stdin-0", "stdin-1"]
    assert sorted(r.key or b"" for r in await on_topic(psettings)) == [b"stdin-0", b"stdin-1"]


@pytest.mark.parametrize(
    ("args", "stdin", "says"),
    [
        (["user", "42", "--title=t"], "", "--type"),
        (["user", "42", "--type=news", "--data=no-equals"], "", "expected KEY=VALUE"),
        (["user", "4 2", "--type=news", "--title=t"], "", "audience.user.user_id"),
        (["all", "--type=news", "--title=t", "--ttl=-5"], "", "expires_at"),
        (["json"], "{not json", "line 1: not JSON"),
        (["json"], "", "no job in the input"),
        (
            ["json"],
            '{"job_id": "ok", "type": "news", "audience": {"kind": "all"},'
            ' "payload": {"title": "t"}, "created_at": "2026-01-01T00:00:00Z"}\n'
            '{"job_id": "broken", "type": "news"}\n',
            "job 2:",
        ),
    ],
    ids=["no-type", "bad-data", "bad-user-id", "negative-ttl", "not-json", "empty", "one-bad"],
)
async def test_bad_input_is_one_clear_line_and_nothing_is_sent(
    psettings: Settings, args: list[str], stdin: str, says: str
) -> None:
    out = await asyncio.to_thread(publish, psettings, *args, stdin=stdin)

    assert out.returncode == 2
    assert says in out.stderr
    assert "Traceback" not in out.stderr
    assert await on_topic(psettings) == []
