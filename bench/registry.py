"""The token registry API on one core against the real database (issue #4's target:
at least 2,000 registrations/s with p99 under 50 ms).

The API runs as ``pushfan registry`` does (uvicorn, httptools, its own pool) but under
uvloop, in its own process pinned to one core; the load generator runs in this process
on another, where the machine has two, and so does PostgreSQL when it was started here
(embedded), as a database server of its own would not share the API's core. Python HTTP
clients spend about a millisecond per request, more than the API does, so the load comes
from a minimal HTTP/1.1 keep-alive client: pre-built requests on persistent connections,
one request in flight per connection, responses parsed only as far as status and length.

Each registration is a distinct user's device (bearer JWT of its own); about 70% are new
devices and 30% repeats of devices registered in an earlier phase (an app launched
again). Phases, each on fresh connections:

1. warm-up (pool connections, prepared statements, caches);
2. ``GET /healthz`` as fast as it goes: the same server and client with no database or
   auth, the baseline the registration rate is a ratio of;
3. ``POST /v1/devices`` as fast as it goes: registrations/s and latency with every
   connection busy;
4. ``POST /v1/devices`` offered at a fixed rate on an open-loop schedule: latency counts
   from when each request was due, so time spent waiting for a free connection counts;
5. ``store.register`` straight on an asyncpg pool from this process, moved to the API's
   core while the API idles: the same statement without HTTP, the other baseline.

Afterwards the table is read back: every token sent must be one active row with its user
and device, and every HTTP answer 201 (new) or 200 (repeat). The CPU lines give the cores
each process used during a phase (``other``: the rest of the machine, which should be
near 0 for the figures to mean anything). Nothing asserts a time.

``python -m bench.registry`` runs it alone (``serve`` is the server process's entry).
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
from collections import Counter, deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import asyncpg
import jwt
import uvloop

from registry import store

SECRET = "pushfan-bench-registry-secret-of-enough-length"
APP_ID = "com.example.app"
CONNECTIONS = 50
NEW_SHARE = 0.7
BEHIND_S = 0.05  # an open-loop backlog of more than this many seconds' requests is falling behind
TICK = 0.001  # paced requests are released in batches this far apart (latency counts from due)
SERVING = "pushfan registry serving on "
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


# --- the HTTP/1.1 client --------------------------------------------------------------


def parse_response(buf: bytes | bytearray) -> tuple[int, int] | None:
    """``(status, length)`` of the HTTP/1.1 response at the start of ``buf``, or None
    while it is incomplete. Only ``Content-Length`` framing is understood (uvicorn sends
    it with every response of the registry); raises ValueError on anything else."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line, *headers = bytes(buf[:end]).split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    status = int(code)
    length = None
    for line in headers:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError(f"malformed header line: {line[:80]!r}")
        name = name.strip().lower()
        if name == b"content-length":
            if not value.strip().isdigit():
                raise ValueError(f"bad content-length: {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not supported")
    if length is None:
        if not (100 <= status < 200 or status in (204, 304)):
            raise ValueError(f"response {status} without content-length")
        length = 0
    total = end + 4 + length
    return (status, total) if len(buf) >= total else None


def http_request(method: str, path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Result:
    seconds: float  # first request due to last response
    latencies: list[float]  # seconds, one per request
    statuses: Counter[int]
    cpu: dict[str, float] = field(default_factory=dict)  # cores used, by process

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def backlog(self, rate: float) -> int:
        """Of an open-loop run at ``rate``: the requests not yet answered when the last
        one fell due (about ``rate`` times the latency while the server keeps up; a
        backlog that grew through the run when it does not)."""
        last_due = (len(self.latencies) - 1) / rate
        return sum(i / rate + lat > last_due for i, lat in enumerate(self.latencies))

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Run:
    """The requests of one phase and the connections working through them."""

    def __init__(self, requests: Sequence[bytes], paced: bool) -> None:
        n = len(requests)
        self.requests, self.paced = requests, paced
        self.due = [0.0] * n  # when each request's latency starts counting
        self.latencies = [0.0] * n
        self.statuses: Counter[int] = Counter()
        self.waiting: deque[int] = deque()
        self.idle: list[_Connection] = []
        self.completed = 0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def release(self, i: int, due: float) -> None:
        self.due[i] = due
        if self.idle:
            self.idle.pop().send(i)
        else:
            self.waiting.append(i)

    def finished(self, conn: _Connection, i: int, status: int) -> None:
        now = time.perf_counter()
        self.latencies[i] = now - self.due[i]
        self.statuses[status] += 1
        self.completed += 1
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)
        if self.completed == len(self.requests) and not self.done.done():
            self.done.set_result(now)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.buf = bytearray()
        self.current = -1
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, i: int) -> None:
        assert self.transport is not None
        self.current = i
        if not self.run.paced:
            self.run.due[i] = time.perf_counter()
        self.transport.write(self.run.requests[i])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            parsed = parse_response(self.buf)
        except ValueError as exc:
            self.run.fail(exc)
            return
        if parsed is None:
            return
        status, used = parsed
        if used != len(self.buf):
            self.run.fail(ValueError("bytes after the response to the only request in flight"))
            return
        self.buf.clear()
        self.run.finished(self, self.current, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.fail(ConnectionError(f"the server closed a connection: {exc}"))


async def drive(
    url: str, requests: Sequence[bytes], *, connections: int = CONNECTIONS, rate: float = 0
) -> Result:
    """Send ``requests`` over ``connections`` keep-alive connections: as fast as they
    are answered, or (``rate`` > 0) each due at ``start + i / rate`` whether or not the
    earlier ones were answered."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    run = _Run(requests, paced=rate > 0)
    conns = []
    try:
        for _ in range(min(connections, len(requests))):
            _, conn = await loop.create_connection(lambda: _Connection(run), host, port)
            conns.append(conn)
        run.idle = list(conns)
        start = time.perf_counter()
        if rate > 0:
            i, n = 0, len(requests)
            while i < n:
                now = time.perf_counter()
                while i < n and start + i / rate <= now:
                    run.release(i, start + i / rate)
                    i += 1
                if i < n:  # a tick of at least 1 ms: shorter sleeps spin this core
                    await asyncio.sleep(max(TICK, start + i / rate - time.perf_counter()))
        else:
            for i in range(len(requests)):
                run.release(i, start)
        end = await run.done
    finally:
        if not run.done.done():
            run.done.cancel()  # closing the connections below is no failure to report
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    return Result(end - start, run.latencies, run.statuses)


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


# --- processes and CPU ----------------------------------------------------------------


def _ticks(pid: int, children: bool = False) -> int:
    """CPU ticks of ``pid`` (with its reaped children's when ``children``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    # after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
    return sum(int(x) for x in fields[11 : 15 if children else 13])


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[1])


class CpuMeter:
    """CPU seconds of the API process, PostgreSQL (when it runs on this machine: its
    postmaster and every child) and this process."""

    def __init__(self, server_pid: int, postmaster: int | None) -> None:
        self.server_pid, self.postmaster = server_pid, postmaster
        self.hz = os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[str, float]:
        out = {"API": _ticks(self.server_pid) / self.hz, "load generator": time.process_time()}
        if self.postmaster is not None:
            try:
                ticks = _ticks(self.postmaster, children=True)
                for entry in os.scandir("/proc"):
                    if entry.name.isdigit():
                        try:
                            if _ppid(int(entry.name)) == self.postmaster:
                                ticks += _ticks(int(entry.name), children=True)
                        except (OSError, ValueError, IndexError):
                            continue  # gone meanwhile
                out["PostgreSQL"] = ticks / self.hz
            except OSError:
                self.postmaster = None
        with open("/proc/stat", "rb") as f:
            # user nice system idle iowait irq softirq steal: all but idle and iowait
            cpu = [int(x) for x in f.readline().split()[1:9]]
        out["machine"] = (sum(cpu) - cpu[3] - cpu[4]) / self.hz
        return out

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
        """Cores used between two samples, by process; ``other`` is the rest of the
        machine (other work on it makes the figures unreliable)."""
        used = {k: (after[k] - before[k]) / wall for k in after if k in before}
        machine = used.pop("machine")
        used["other"] = max(0.0, machine - sum(used.values()))
        return used

    async def measure(self, phase: Coroutine[Any, Any, Result]) -> Result:
        before, t0 = self.sample(), time.perf_counter()
        result = await phase
        after, wall = self.sample(), time.perf_counter() - t0
        result.cpu = self.cores(before, after, wall)
        return result


async def find_postmaster(url: str) -> int | None:
    """The local PostgreSQL server's pid, if the database runs on this machine."""
    conn = await asyncpg.connect(url)
    try:
        # read while the backend lives: it exits when the connection closes
        return _postmaster_of(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await conn.close()


def _postmaster_of(backend: int) -> int | None:
    try:
        pid = _ppid(backend)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"postgres" in f.read() else None
    except (OSError, ValueError, IndexError):
        return None  # another machine or another pid namespace (a container)


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


def start_server(database_url: str, cpu: int | None) -> ServerProcess:
    cmd = [sys.executable, "-m", "bench.registry", "serve"]
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


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin a process and its children (a postmaster and its backends: backends started
    later inherit the postmaster's affinity)."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, cpus)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _ppid(int(entry.name)) == pid:
                    os.sched_setaffinity(int(entry.name), cpus)


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
            + f", {stored_note}",
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
        _run_uvloop(_bench(database_url, n, rate, seconds, pool_size, cores))
    finally:
        os.sched_setaffinity(0, set(cpus))


def _run_uvloop(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _standalone(argv: Sequence[str]) -> None:
    from pushfan.db import migrate
    from pushfan.logs import configure_logging
    from pushfan.settings import LoggingSettings, load_settings
    from pushfan.stack import start_database

    parser = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__)
    parser.add_argument("--registrations", type=int, default=8_000, help="per phase")
    parser.add_argument("--rate", type=float, default=2_000, help="offered registrations/s")
    parser.add_argument("--seconds", type=float, default=4, help="of the paced phase")
    args = parser.parse_args(argv)
    configure_logging(LoggingSettings(level="WARNING"))
    db = load_settings().database
    database = start_database(
        db.url.get_secret_value() if "url" in db.model_fields_set else None,
        purpose="pushfan_bench",
    )
    try:
        print(f"pushfan bench registry: PostgreSQL {database.kind}")
        asyncio.run(migrate(database.url))
        run(
            database.url,
            args.registrations,
            args.rate,
            args.seconds,
            pin_database=database.kind == "embedded",
        )
    finally:
        database.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    else:
        _standalone(sys.argv[1:])
