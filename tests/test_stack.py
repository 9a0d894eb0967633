"""The embedded stack's lifecycle: what is started is stopped, even after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pushfan.kafka import make_consumer
from pushfan.settings import load_settings
from pushfan.stack import Broker, Database, Stack, reap_orphans, redact_url

CHILD = textwrap.dedent(
    """
    import time
    from pushfan.stack import start_database
    db = start_database(None, purpose="orphan")
    print(db.server_url, flush=True)
    time.sleep(120)
    """
)


def _postmaster_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "pushfan-pg-.*/data"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.slow
def test_a_sigkilled_owner_leaves_nothing_after_the_next_start() -> None:
    before = _postmaster_pids()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert child.stdout is not None
    server_url = child.stdout.readline()
    # The socket lives in the cluster's data directory, inside the owned directory.
    owned_dir = os.path.dirname(server_url.split("host=", 1)[1].strip())
    started = _postmaster_pids() - before
    assert started, "the child's PostgreSQL should be running"

    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert _postmaster_pids() - before, "SIGKILL cannot stop it: it outlives its owner"

    reaped = reap_orphans()

    assert owned_dir in reaped
    deadline = time.monotonic() + 10
    while _postmaster_pids() & started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _postmaster_pids() & started
    assert not os.path.exists(owned_dir)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cret@db/push", "postgresql://app:***@db/push"),
        (
            "postgresql://app@db/push?password=s3cret&sslmode=require",
            "postgresql://app@db/push?password=***&sslmode=require",
        ),
        (
            "postgresql://app@db/push?sslmode=require&PASSWORD=s3cret",
            "postgresql://app@db/push?sslmode=require&PASSWORD=***",
        ),
        ("postgresql://postgres@/x?host=/tmp/pg", "postgresql://postgres@/x?host=/tmp/pg"),
    ],
)
def test_passwords_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("kind", "bound", "configured", "expected"),
    [("tansu", 50, 500, 50), ("tansu", 50, 20, 20), ("external", None, 500, 500)],
)
async def test_a_broker_that_holds_fetches_gets_a_shorter_wait_never_a_longer_one(
    kind: str, bound: int | None, configured: int, expected: int
) -> None:
    broker = Broker("127.0.0.1:9", kind, kind == "external", fetch_wait_bound_ms=bound)  # type: ignore[arg-type]
    database = Database("postgresql://u@127.0.0.1/x", "external", "postgresql://u@127.0.0.1/y")
    base = load_settings()
    kafka = base.kafka.model_copy(update={"fetch_max_wait_ms": configured})

    applied = Stack(broker, database).apply(base.model_copy(update={"kafka": kafka}))

    assert applied.kafka.fetch_max_wait_ms == expected
    consumer = make_consumer(applied.kafka, group_id=None)  # not started: no connection
    assert consumer._fetch_max_wait_ms == expected  # what aiokafka's fetcher will use
