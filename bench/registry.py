"""The token registry API on one core against the real database (issue #4's target:
at least 2,000 registrations/s with p99 under 50 ms).

The API runs as ``pushfan registry`` does (uvicorn, httptools, its own pool) but under
uvloop, in its own process pinned to one core; the load generator runs in this process
on another, where the machine has two, and so does PostgreSQL when it was started here
(embedded), as a database server of its own would not share the API's core. The load
comes from a minimal HTTP/1.1 keep-alive client (``bench/registry_client.py``); the CPU
figures from ``/proc`` (``bench/cpu.py``).

Each registration is a distinct user's device (bearer JWT of its own); about 70% are new
devices and 30% repeats of devices registered in an earlier phase (an app launched again,
with the bearer token it had, which the API has verified already: a new token costs it a
signature check). Phases, each on fresh connections:

1. warm-up (pool connections, prepared statements, caches);
2. ``GET /healthz`` as fast as it goes: the same server and client with no database or
   auth, the baseline the registration rate is a ratio of;
3. ``POST /v1/devices`` as fast as it goes: registrations/s and latency with every
   connection busy;
4. ``POST /v1/devices`` offered at a fixed rate on an open-loop schedule: latency counts
   from when each request was due, so time spent waiting for a free connection counts
   (and how late the load generator itself let requests go is printed, to tell the two
   apart);
5. ``store.register`` straight on an asyncpg pool from this process, moved to the API's
   core while the API idles: the same statement without HTTP, the other baseline.

Afterwards the table is read back: every token sent must be one active row with its user
and device, and every HTTP answer 201 (new) or 200 (repeat). The CPU lines give the cores
each process used during a phase (``other``: the rest of the machine, which should be
near 0 for the figures to mean anything). Nothing asserts a time.

``python -m bench.registry`` runs it alone (``serve`` is the server process's entry);
``python -m bench.registry_instructions`` counts the API's instructions per request,
figures that hold still on a busy machine where these move by 10-20% between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import jwt
import uvloop

from bench.cpu import CpuMeter, find_postmaster, pin_tree
from bench.registry_client import CONNECTIONS, Result, drive, http_request
from pushfan.stack import Database
from registry import store

SECRET = "pushfan-bench-registry-secret-of-enough-length"
APP_ID = "com.example.app"
NEW_SHARE = 0.7
BEHIND_S = 0.05  # an open-loop backlog of more than this many seconds' requests is falling behind
SERVING = "pushfan registry serving on "
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


# --- the workload ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    user: str
    token: str
    device_id: str
    bearer: str


class Workload:
    """Registrations phase by phase: ~70% new devices (each a new user), ~30% repeats of
    devices registered in an earlier phase, so no repeat races its first registration."""

    def __init__(self, seed: int = 4) -> None:
        self.rnd = random.Random(seed)
        self.prefix = uuid.uuid4().hex[:8]  # this run's tokens start with it
        self.devices: list[Device] = []
        self.exp = int(time.time()) + 3600

    def phase(self, n: int) -> list[tuple[Device, bool]]:
        settled = len(self.devices)
        out = []
        for _ in range(n):
            if settled and self.rnd.random() >= NEW_SHARE:
                out.append((self.devices[self.rnd.randrange(settled)], False))
            else:
                out.append((self._new(), True))
        return out

    def _new(self) -> Device:
        i = len(self.devices)
        user = f"bench-{self.prefix}-{i}"
        claims = {"sub": user, "iss": "pushfan", "aud": "pushfan-registry", "exp": self.exp}
        device = Device(
            user=user,
            token=f"{self.prefix}{i:056x}",
            device_id=f"dev-{self.prefix}-{i}",
            bearer="Bearer " + jwt.encode(claims, SECRET, algorithm="HS256"),
        )
        self.devices.append(device)
        return device


def registration_body(d: Device) -> bytes:
    return (
        f'{{"token": "{d.token}", "platform": "ios", "device_id": "{d.device_id}", '
        f'"app_id": "{APP_ID}", "app_version": "4.2.0", "locale": "en-GB", '
        f'"time_zone": "Europe/London"}}'
    ).encode()


def registration_requests(host: str, work: list[tuple[Device, bool]]) -> list[bytes]:
    return [
        http_request(
            "POST",
            "/v1/devices",
            host,
            {"authorization": d.bearer, "content-type": "application/json"},
            registration_body(d),
        )
        for d, _ in work
    ]


def expected_statuses(work: list[tuple[Device, bool]]) -> Counter[int]:
    new = sum(is_new for _, is_new in work)
    return Counter({201: new, 200: len(work) - new})


async def direct(
    url: str, work: list[tuple[Device, bool]], pool_size: int, concurrency: int
) -> tuple[Result, Counter[str]]:
    """The registrations through ``store.register`` on a pool, without HTTP."""
    pool = await asyncpg.create_pool(url, min_size=pool_size, max_size=pool_size)
    assert pool is not None
    latencies = [0.0] * len(work)
    changes: Counter[str] = Counter()
    todo = iter(enumerate(work))

    async def worker() -> None:
        for i, (d, _) in todo:
            t0 = time.perf_counter()
            reg = store.Registration(
                d.token, "ios", d.device_id, APP_ID, "4.2.0", "en-GB", "Europe/London"
            )
            changes[(await store.register(pool, d.user, reg)).change.value] += 1
            latencies[i] = time.perf_counter() - t0

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    finally:
        await pool.close()
    return Result(seconds, latencies, Counter()), changes


async def check_stored(url: str, workload: Workload) -> str | None:
    """None when every device sent is one active row with its user and device (and no
    other row has this run's prefix); else what differs."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT token, user_id, device_id, is_active FROM device_tokens"
            " WHERE starts_with(token, $1)",
            workload.prefix,
        )
    finally:
        await conn.close()
    want = {d.token: (d.user, d.device_id, True) for d in workload.devices}
    got = {r["token"]: (r["user_id"], r["device_id"], r["is_active"]) for r in rows}
    if got == want and len(rows) == len(want):
        return None
    missing = len(want.keys() - got.keys())
    extra = len(got.keys() - want.keys())
    wrong = sum(got[t] != want[t] for t in want.keys() & got.keys())
    return f"{missing} missing, {extra} unexpected, {wrong} wrong of {len(want)}"


# --- the server process ---------------------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(database_url: str, cpu: int | None, wrapper: Sequence[str] = ()) -> ServerProcess:
    """The API in a process of its own (run under ``wrapper``, e.g. valgrind, if given)."""
    cmd = [*wrapper, sys.executable, "-m", "bench.registry", "serve"]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PUSHFAN_DATABASE__URL": database_url,
        "PUSHFAN_REGISTRY__HOST": "127.0.0.1",
        "PUSHFAN_REGISTRY__PORT": "0",
        "PUSHFAN_REGISTRY__JWT_ALGORITHM": "HS256",
        "PUSHFAN_REGISTRY__JWT_SECRET": SECRET,
        "PUSHFAN_LOGGING__LEVEL": "WARNING",
    }
    env.pop("PUSHFAN_REGISTRY__JWT_PUBLIC_KEY_FILE", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(SERVING):
            return ServerProcess(proc, line[len(SERVING) :].split()[0])
    proc.wait(10)
    raise RuntimeError(f"the registry server exited with {proc.returncode} before serving")


def serve() -> None:
    """The server process: ``pushfan registry`` under uvloop."""
    from pushfan.cli import exit_on_sigterm
    from pushfan.logs import configure_logging
    from pushfan.settings import load_settings
    from registry.server import serve as serve_registry

    exit_on_sigterm()
    settings = load_settings()
    configure_logging(settings.logging)
    with contextlib.suppress(SystemExit):  # SIGTERM, once uvicorn has finished
        uvloop.run(serve_registry(settings))


# --- the benchmark --------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:5.1f} ms"


def _line(name: str, r: Result, unit: str, note: str) -> str:
    return (
        f"registry {name:<26} {r.rate:>8,.0f} {unit}   p50 {_ms(r.percentile(0.5))}"
        f"  p99 {_ms(r.percentile(0.99))}   ({note})"
    )


def _cpu(r: Result) -> str:
    return ", ".join(f"{name} {cores:.2f}" for name, cores in r.cpu.items())


@dataclass(frozen=True)
class Cores:
    """Where each part runs on a machine of two cores or more."""

    api: int  # the API process alone (and the direct baseline, while the API idles)
    rest: int  # this process and, when it was started here, PostgreSQL
    database_pinned: bool


async def _bench(
    database_url: str, n: int, rate: float, seconds: float, pool_size: int, cores: Cores | None
) -> None:
    server = start_server(database_url, None if cores is None else cores.api)
    postmaster = await find_postmaster(database_url)
    everywhere = os.sched_getaffinity(server.proc.pid) | os.sched_getaffinity(0)
    if cores is not None and cores.database_pinned and postmaster is not None:
        pin_tree(postmaster, {cores.rest})
    try:
        host = urlsplit(server.url).netloc
        meter = CpuMeter(server.proc.pid, postmaster)
        workload = Workload()
        health = http_request("GET", "/healthz", host, {}, b"")

        # 1. warm-up
        warm = workload.phase(min(n, 2_000))
        warmed = await drive(server.url, registration_requests(host, warm))
        await drive(server.url, [health] * min(n, 2_000))
        phases: list[tuple[str, list[tuple[Device, bool]], Result]] = [("warm-up", warm, warmed)]

        # 2. the baseline: no database, no auth
        healthz = await meter.measure(drive(server.url, [health] * n))

        # 3. registrations as fast as they go
        work = workload.phase(n)
        saturated = await meter.measure(drive(server.url, registration_requests(host, work)))
        phases.append(("saturation", work, saturated))

        # 4. registrations at the target rate, open loop
        work = workload.phase(round(rate * seconds))
        paced = await meter.measure(drive(server.url, registration_requests(host, work), rate=rate))
        phases.append(("paced", work, paced))

        # 5. the statement without HTTP, from this process on the API's core
        work = workload.phase(n)
        if cores is not None:
            os.sched_setaffinity(0, {cores.api})
        try:
            t0, before = time.perf_counter(), meter.sample()
            straight, changes = await direct(database_url, work, pool_size, CONNECTIONS)
            after, wall = meter.sample(), time.perf_counter() - t0
        finally:
            if cores is not None:
                os.sched_setaffinity(0, {cores.rest})
        straight.cpu = meter.cores(before, after, wall)
        direct_ok = changes == Counter(
            {"created": expected_statuses(work)[201], "refreshed": expected_statuses(work)[200]}
        )

        stored = await check_stored(database_url, workload)
    finally:
        server.stop()
        if cores is not None and cores.database_pinned and postmaster is not None:
            pin_tree(postmaster, everywhere)

    bad = [
        f"{name}: {dict(r.statuses)} (expected {dict(expected_statuses(w))})"
        for name, w, r in phases
        if r.statuses != expected_statuses(w)
    ]
    if healthz.statuses != Counter({200: n}):
        bad.append(f"healthz: {dict(healthz.statuses)}")
    if not direct_ok:
        bad.append(f"direct: {dict(changes)}")
    stored_note = "all stored" if stored is None and not bad else "NOT ALL STORED, see below"
    _, sat_work, _ = phases[1]
    new = sum(is_new for _, is_new in sat_work)

    if cores is None:
        where = "everything on one core"
    else:
        db = "PostgreSQL" if cores.database_pinned and postmaster is not None else None
        where = (
            f"API process (uvloop) alone on cpu {cores.api}, load generator"
            + (f" and {db}" if db else "")
            + f" on cpu {cores.rest}"
            + ("" if db else ", PostgreSQL not pinned")
        )
    print(
        f"registry: {where}; {CONNECTIONS} keep-alive connections, API pool of {pool_size},"
        f" {NEW_SHARE:.0%} new devices"
    )
    print(_line("GET /healthz (baseline)", healthz, "req/s", f"{n:,} requests"))
    print(
        _line(
            "POST /v1/devices",
            saturated,
            "reg/s",
            f"{n:,} requests, {new:,} new + {n - new:,} repeats, {stored_note}",
        )
    )
    print(
        _line(
            f"at {rate:,.0f}/s offered",
            paced,
            "reg/s",
            f"{len(paced.latencies):,} requests over {paced.seconds:.1f} s, open loop,"
            f" {paced.backlog(rate):,} unanswered when the last fell due"
            + (" = FALLING BEHIND" if paced.backlog(rate) > rate * BEHIND_S else "")
            + f", sent up to {_ms(paced.lag(0.99)).strip()} late (p99), {stored_note}",
        )
    )
    print(
        _line(
            "store.register (baseline)",
            straight,
            "reg/s",
            f"{n:,} registrations, asyncpg pool of {pool_size}, one process, no HTTP",
        )
    )
    print(
        f"registry ratios: POST /v1/devices / GET /healthz {saturated.rate / healthz.rate:.2f},"
        f" / store.register direct {saturated.rate / straight.rate:.2f}"
    )
    for name, r in (
        ("GET /healthz", healthz),
        ("saturation", saturated),
        (f"{rate:,.0f}/s", paced),
        ("direct", straight),
    ):
        print(f"registry CPU (cores) {name:<13} {_cpu(r)}")
    total = sum(len(w) for _, w, _ in phases) + len(work)
    if stored is None and not bad:
        print(
            f"registry check: {total:,} registrations ({len(workload.devices):,} devices) ->"
            f" {len(workload.devices):,} active rows, each once with its user and device;"
            " every answer 201 new / 200 repeat"
        )
    else:
        print(f"registry check FAILED: rows {stored or 'ok'}; answers {'; '.join(bad) or 'ok'}")


def run(
    database_url: str,
    n: int = 8_000,
    rate: float = 2_000,
    seconds: float = 4,
    *,
    pin_database: bool = False,
) -> None:
    """Run the registry benchmark against the (migrated) database at ``database_url``.
    ``pin_database``: PostgreSQL was started here (embedded), so it may be pinned off the
    API's core, as a database server of its own would be."""
    from pushfan.settings import load_settings

    pool_size = load_settings().database.max_pool_size  # what the API process will use
    cpus = sorted(os.sched_getaffinity(0))
    cores = Cores(cpus[-1], cpus[0], pin_database) if len(cpus) > 1 else None
    if cores is not None:
        os.sched_setaffinity(0, {cores.rest})
    try:
        run_uvloop(_bench(database_url, n, rate, seconds, pool_size, cores))
    finally:
        os.sched_setaffinity(0, set(cpus))


def run_uvloop(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@contextlib.contextmanager
def standalone_database() -> Iterator[Database]:
    """A migrated database for a benchmark run on its own: the server ``DATABASE_URL``
    names, else an embedded one (stopped at the end)."""
    from pushfan.db import migrate
    from pushfan.logs import configure_logging
    from pushfan.settings import LoggingSettings, load_settings
    from pushfan.stack import start_database

    configure_logging(LoggingSettings(level="WARNING"))
    db = load_settings().database
    database = start_database(
        db.url.get_secret_value() if "url" in db.model_fields_set else None,
        purpose="pushfan_bench",
    )
    try:
        asyncio.run(migrate(database.url))
        yield database
    finally:
        database.stop()


def _standalone(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__)
    parser.add_argument("--registrations", type=int, default=8_000, help="per phase")
    parser.add_argument("--rate", type=float, default=2_000, help="offered registrations/s")
    parser.add_argument("--seconds", type=float, default=4, help="of the paced phase")
    args = parser.parse_args(argv)
    with standalone_database() as database:
        print(f"pushfan bench registry: PostgreSQL {database.kind}")
        run(
            database.url,
            args.registrations,
            args.rate,
            args.seconds,
            pin_database=database.kind == "embedded",
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    else:
        _standalone(sys.argv[1:])
