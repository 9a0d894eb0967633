"""The embedded stack's lifecycle: what is started is stopped, even after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pushfan.stack import reap_orphans, redact_url

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
