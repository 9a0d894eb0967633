"""Instructions the registry API executes per request, counted by valgrind's callgrind.

The CPU figures of ``bench/registry.py`` move by 10-20% between runs on a machine that
other work shares; instruction counts hold still (two runs of one commit agree within
0.5%), so they compare commits there. They leave out the kernel (system calls) and what
an instruction costs (cache misses), so they complement the CPU figures rather than
replace them. The API runs under callgrind, some 50 times slower, with the benchmark's
workload (70% new devices, each with a bearer token of its own) sent closed loop over a
few connections; the counters are zeroed after a warm-up and read after each phase.

``python -m bench.registry_instructions`` runs it against its own database (as
``python -m bench.registry`` does); it needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench.registry import (
    Workload,
    expected_statuses,
    registration_requests,
    run_uvloop,
    standalone_database,
    start_server,
)
from bench.registry_client import drive, http_request

CONNECTIONS = 8
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


async def count(database_url: str, n: int) -> dict[str, float]:
    """Instructions per request of the API process, by route: ``n`` registrations and
    ``n`` health checks after a warm-up of half as many each."""
    with tempfile.TemporaryDirectory(prefix="pushfan-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        valgrind = ["valgrind", "-q", "--tool=callgrind", f"--callgrind-out-file={out}"]
        server = start_server(database_url, None, wrapper=valgrind)
        try:
            host = urlsplit(server.url).netloc
            workload = Workload()
            health = http_request("GET", "/healthz", host, {}, b"")
            warm = registration_requests(host, workload.phase(n // 2))
            await drive(server.url, warm, connections=CONNECTIONS)
            await drive(server.url, [health] * (n // 2), connections=CONNECTIONS)
            work = workload.phase(n)
            phases = [
                ("POST /v1/devices", registration_requests(host, work), expected_statuses(work)),
                ("GET /healthz", [health] * n, Counter({200: n})),
            ]
            per_request = {}
            for name, requests, expected in phases:
                _control(server.proc.pid, "--zero")
                result = await drive(server.url, requests, connections=CONNECTIONS)
                _control(server.proc.pid, "--dump")
                if result.statuses != expected:
                    raise RuntimeError(f"{name}: {dict(result.statuses)}, expected {expected}")
                per_request[name] = latest_total(out) / n
        finally:
            server.stop()
    return per_request


def _control(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True)


def latest_total(out: Path) -> int:
    """The instruction total of the latest dump (``callgrind.out.1``, ``.2``, ...)."""
    dumps = sorted(out.parent.glob(f"{out.name}.*"), key=lambda p: int(p.suffix[1:]))
    found = _TOTAL.search(dumps[-1].read_bytes())
    if found is None:
        raise RuntimeError(f"no instruction total in {dumps[-1]}")
    return int(found[1])


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.registry_instructions", description=__doc__
    )
    parser.add_argument("--requests", type=int, default=800, help="per route")
    args = parser.parse_args(argv)
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("needs valgrind (apt-get install valgrind)")
    with standalone_database() as database:
        per_request = run_uvloop(count(database.url, args.requests))
    figures = ", ".join(f"{name} {k / 1000:,.1f}k" for name, k in per_request.items())
    print(
        f"registry instructions per request (callgrind, {args.requests:,} each,"
        f" {CONNECTIONS} connections): {figures}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
