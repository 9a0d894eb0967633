"""End to end: one broadcast through ``pushfan worker`` processes (issue #5's "Speed and
memory").

A fresh database on the bench's PostgreSQL gets ``users`` users with two active tokens
each (one Android, one iOS) and a segment holding all of them, bulk-loaded with COPY. The
FCM and APNs emulators run in a process of their own (``pushfan emulators``), the workers
as ``python -m pushfan.cli worker`` configured only by ``PUSHFAN_*`` variables, on topics
and a consumer group of their own per phase, with ``FCM_PER_MINUTE=0`` (no rate limit).
Where the machine has two cores or more and ``taskset`` exists, a single worker runs alone
on the first core; the emulators, this process and what the stack started here (an
embedded PostgreSQL, the Tansu broker) on the last, as servers of their own would not
share the worker's core. Two workers get one core each, the second sharing it with the
rest: no placement gives them a core each on two cores.

1. **Senders' own rate**: the lean FCM and APNs senders (``bench/senders.py``) from this
   process, moved to the worker's core, against the same emulator process: each alone,
   then both at once in this audience's platform mix, before and after the broadcasts
   (the machine drifts). The mean of the last two is the baseline of the end-to-end
   ratio.
2. **One worker**: warmed up (single-user jobs on every partition, so it has joined the
   group and opened its connections), then one segment job is published and the clock
   runs from the publish to the ledger saying ``completed``. Printed: tokens/s, the ratio
   to the senders' rate, the time per stage from the worker's ``/metrics``
   (``pushfan_worker_stage_seconds`` by stage, the warm-up subtracted: resolve, query,
   send and report per page, commit per record, a shard or the job), its peak RSS
   (``VmHWM``), the cores each process used meanwhile and each cpu's busy share (from
   ``/proc``), and the worker's CPU per token next to the senders' own.
3. **Two workers** in one group, the same broadcast under a new job_id: the speed-up over
   one. On two cores the emulators, PostgreSQL and both workers share the machine, so
   the ratio says what this machine allows, not what the worker would do with a core
   each; the pages each worker sent show how evenly the shards were shared.
4. With ``--big``: one worker, 1,000,000 users (a database of its own), for peak RSS.

Before each broadcast ``last_delivered_at`` is cleared and the table vacuumed, so every
broadcast writes the same rows (the report stage marks tokens delivered at most once a
day: a second broadcast on the same day would skip those writes). Every token must be
delivered exactly once by the emulators' log and counted once by the ledger. Nothing
asserts a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from bench.cpu import find_postmaster, pin_tree
from bench.senders import EmulatorProcess, lean_apns, lean_fcm, start_emulator_process
from pushfan.db import migrate
from pushfan.emulators.runner import DEFAULT_APNS_TOPIC, point_at
from pushfan.kafka import ensure_topics, make_producer, start_client
from pushfan.settings import Settings, TopicSettings, subprocess_env
from pushfan.stack import Stack, free_port
from schemas import NotificationJob
from worker import ledger

APP_ID = "com.example.app"
WARM_USER = "warm-user"
BIG_USERS = 1_000_000
RSS_TARGET_MB = 200
STAGES = ("resolve", "query", "send", "report")  # a page each; "commit": a record
CHUNK_USERS = 100_000  # users per COPY
ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Cpus = tuple[int, ...]


def cpu_name(cpus: Cpus) -> str:
    return f"cpu {cpus[0]}" if len(cpus) == 1 else f"cpus {','.join(map(str, cpus))}"


def user_id(i: int) -> str:
    return f"u{i:08d}"


def fcm_token(i: int) -> str:  # the shape of bench/senders.py's, another prefix
    return f"fan{i:09d}:APA91b{'x' * 120}"


def apns_token(i: int) -> str:
    return f"fa{i:062x}"


# --- the database ----------------------------------------------------------------------


async def seed(conn: asyncpg.Connection, users: int, segment: str) -> dict[str, int]:
    """``users`` users with one Android and one iOS token each, all in ``segment``, and
    the warm-up user (two tokens, in no segment). Tokens per platform."""
    columns = ["token", "user_id", "platform", "device_id", "app_id"]
    for start in range(0, users, CHUNK_USERS):
        ids = range(start, min(users, start + CHUNK_USERS))
        rows = [(fcm_token(i), user_id(i), "android", f"d{i}-a", APP_ID) for i in ids]
        rows += [(apns_token(i), user_id(i), "ios", f"d{i}-i", APP_ID) for i in ids]
        await conn.copy_records_to_table("device_tokens", records=rows, columns=columns)
        await conn.copy_records_to_table(
            "segment_members",
            records=[(segment, user_id(i)) for i in ids],
            columns=["segment", "user_id"],
        )
    warm = [
        (fcm_token(users + 1), WARM_USER, "android", "warm-a", APP_ID),
        (apns_token(users + 1), WARM_USER, "ios", "warm-i", APP_ID),
    ]
    await conn.copy_records_to_table("device_tokens", records=warm, columns=columns)
    await conn.execute("VACUUM ANALYZE device_tokens, segment_members")
    return {"android": users, "ios": users}


async def fresh_state(conn: asyncpg.Connection) -> None:
    """Every token as if never delivered to, the table vacuumed (visibility map set)."""
    await conn.execute(
        "UPDATE device_tokens SET last_delivered_at = NULL WHERE last_delivered_at IS NOT NULL"
    )
    await conn.execute("VACUUM ANALYZE device_tokens")


# --- worker processes ------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: SIGTERM it when this process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _proc_kb(pid: int, field_name: str) -> int:
    """A ``/proc/PID/status`` figure in kB (VmHWM: peak RSS; VmRSS: RSS now)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    metrics_port: int
    where: str  # its placement, for the output
    log_path: Path
    log: IO[bytes]
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def short(self) -> str:
        """Its name in the output: worker, or worker A and worker B."""
        return self.name.split(" ", 2)[-1] if self.name.count(" ") > 2 else "worker"

    def peak_rss_kb(self) -> int:
        return _proc_kb(self.pid, "VmHWM")

    def rss_kb(self) -> int:
        return _proc_kb(self.pid, "VmRSS")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM (a graceful drain), then wait; SIGKILL only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.exit_code = self.proc.returncode
        self.log.close()


def start_worker(settings: Settings, name: str, cpus: Cpus, logdir: Path) -> WorkerProcess:
    """``pushfan worker`` on ``cpus`` (with taskset where it exists), until stopped."""
    port = free_port()
    worker = settings.worker.model_copy(update={"metrics_port": port})
    env = subprocess_env(settings.model_copy(update={"worker": worker}))
    cmd = [sys.executable, "-m", "pushfan.cli", "worker"]
    if shutil.which("taskset"):
        # taskset execs the worker: the pid is the worker's
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]

    def setup() -> None:
        _die_with_parent()
        os.sched_setaffinity(0, set(cpus))  # without taskset; this process may be pinned

    log_path = logdir / f"{name.replace(' ', '-').replace(':', '')}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
        preexec_fn=setup,
    )
    return WorkerProcess(name, proc, port, cpu_name(cpus), log_path, log)


# --- /metrics and /proc ----------------------------------------------------------------


async def scrape(client: httpx.AsyncClient, port: int) -> Samples:
    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def summed(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def minus(after: Samples, before: Samples) -> Samples:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def plus(parts: Sequence[Samples]) -> Samples:
    out: Samples = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _cpu_ticks(pid: int, *, reaped: bool = False) -> int:
    """utime + stime of ``pid`` (and of its reaped children when ``reaped``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return sum(int(x) for x in fields[11 : 15 if reaped else 13])


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # gone meanwhile


def _children(pid: int) -> list[int]:
    return [
        int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and _ppid(int(e.name)) == pid
    ]


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
    return ""


def _proc_stat() -> dict[str, list[int]]:
    """``/proc/stat``'s cpu lines: user nice system idle iowait irq softirq steal, in ticks."""
    with open("/proc/stat") as f:
        return {
            parts[0]: [int(x) for x in parts[1:9]]
            for parts in (line.split() for line in f)
            if parts and parts[0].startswith("cpu")
        }


def tansu_pid() -> int | None:
    """The Tansu broker, when this process started it."""
    return next((p for p in _children(os.getpid()) if _comm(p).startswith("tansu")), None)


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a running process (a multi-threaded broker)."""
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), cpus)


@dataclass
class CpuUse:
    procs: dict[str, float]  # cores used, by process; "other": the rest of the machine
    cpus: dict[str, float]  # busy share of each cpu (irq, softirq and steal included)

    def line(self) -> str:
        procs = ", ".join(f"{k} {v:.2f}" for k, v in self.procs.items())
        cpus = ", ".join(f"{k} {v:.0%}" for k, v in self.cpus.items())
        return f"{procs}; busy {cpus}"


class CpuMeter:
    """CPU seconds of named processes, PostgreSQL (a local postmaster and its children),
    the Tansu broker, this process, and each cpu of the machine."""

    def __init__(self, named: dict[str, int], postmaster: int | None) -> None:
        self.named = dict(named)
        self.postmaster = postmaster
        self.broker = tansu_pid()
        self.hz = os.sysconf("SC_CLK_TCK")

    def sample(self) -> tuple[dict[str, float], dict[str, list[int]]]:
        out: dict[str, float] = {}
        for name, pid in self.named.items():
            with contextlib.suppress(OSError):
                out[name] = _cpu_ticks(pid) / self.hz
        if self.postmaster is not None:
            with contextlib.suppress(OSError):
                ticks = _cpu_ticks(self.postmaster, reaped=True)
                for child in _children(self.postmaster):
                    with contextlib.suppress(OSError):
                        ticks += _cpu_ticks(child, reaped=True)
                out["PostgreSQL"] = ticks / self.hz
        if self.broker is not None:
            with contextlib.suppress(OSError):
                out["broker"] = _cpu_ticks(self.broker) / self.hz
        out["bench"] = time.process_time()
        return out, _proc_stat()

    def use(
        self,
        before: tuple[dict[str, float], dict[str, list[int]]],
        after: tuple[dict[str, float], dict[str, list[int]]],
        wall: float,
    ) -> CpuUse:
        procs = {k: (v - before[0][k]) / wall for k, v in after[0].items() if k in before[0]}
        d = {k: [a - b for a, b in zip(v, before[1][k], strict=True)] for k, v in after[1].items()}

        def busy(t: list[int]) -> float:
            return (sum(t) - t[3] - t[4]) / self.hz / wall

        whole = d.pop("cpu")
        procs["irq+softirq"] = (whole[5] + whole[6]) / self.hz / wall
        procs["steal"] = whole[7] / self.hz / wall
        procs["other"] = max(0.0, busy(whole) - sum(procs.values()))
        return CpuUse(procs, {k: busy(v) for k, v in sorted(d.items())})


# --- the emulators' delivery log -------------------------------------------------------


@dataclass
class Delivered:
    total: int  # deliveries
    unique: int  # distinct tokens


async def delivered(em: EmulatorProcess, port: int) -> Delivered:
    """What the emulator on ``port`` logged since its last reset; then reset it."""
    base = f"https://127.0.0.1:{port}/_emulator"
    async with httpx.AsyncClient(verify=str(em.credentials.ca_file), timeout=120) as client:
        log = (await client.get(f"{base}/deliveries")).json()
        await client.post(f"{base}/reset")
    return Delivered(int(log["total"]), len(log["per_token"]))


async def reset_emulators(em: EmulatorProcess) -> None:
    async with httpx.AsyncClient(verify=str(em.credentials.ca_file)) as client:
        for port in (em.fcm_port, em.apns_port):
            await client.post(f"https://127.0.0.1:{port}/_emulator/reset")


# --- the senders' own rate -------------------------------------------------------------


@dataclass
class Rate:
    """The lean senders from this process, against the emulator process."""

    tokens: int
    seconds: float
    client_cores: float  # this process's CPU meanwhile
    emulator_cores: float
    exact: bool  # every token delivered, and logged by the emulators, once

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_us(self) -> float:
        """The senders' CPU per token."""
        return self.client_cores * self.seconds / self.tokens * 1e6


async def lean_rate(em: EmulatorProcess, n_fcm: int, n_apns: int, cpus: Cpus) -> Rate:
    """``n_fcm`` and ``n_apns`` tokens through the lean senders at once (bench/senders.py,
    batches of 1000), this process on ``cpus`` (the worker's core) meanwhile."""
    everywhere = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        await reset_emulators(em)
        hz = os.sysconf("SC_CLK_TCK")
        t0, cpu0, em0 = time.perf_counter(), time.process_time(), _cpu_ticks(em.proc.pid)
        results = await asyncio.gather(
            *([lean_fcm(em, n_fcm)] if n_fcm else []),
            *([lean_apns(em, n_apns)] if n_apns else []),
        )
        seconds = time.perf_counter() - t0
        client = (time.process_time() - cpu0) / seconds
        emulator = (_cpu_ticks(em.proc.pid) - em0) / hz / seconds
    finally:
        os.sched_setaffinity(0, everywhere)
    ok = sum(delivered_ok for _, delivered_ok in results)
    logged = (await delivered(em, em.fcm_port), await delivered(em, em.apns_port))
    exact = ok == sum(d.total for d in logged) == sum(d.unique for d in logged) == n_fcm + n_apns
    return Rate(n_fcm + n_apns, seconds, client, emulator, exact)


# --- one broadcast ---------------------------------------------------------------------


def news_job(audience: dict[str, Any], job_id: str) -> NotificationJob:
    """The message bench/senders.py sends, so both measure the same payload."""
    now = datetime.now(UTC)
    return NotificationJob.model_validate(
        {
            "job_id": job_id,
            "type": "news",
            "audience": audience,
            "payload": {"title": "Breaking", "body": "Something happened.", "data": {"k": "v"}},
            "created_at": now - timedelta(seconds=1),
            "expires_at": now + timedelta(hours=2),
        }
    )


def phase_settings(settings: Settings, url: str, em: EmulatorProcess, tag: str) -> Settings:
    """``settings`` for one phase: its own topics and group, the fresh database, the
    emulator process, no FCM rate limit."""
    prefix = f"bench-fanout-{tag}-{uuid.uuid4().hex[:6]}."
    kafka = settings.kafka.model_copy(update={"topics": TopicSettings.prefixed(prefix)})
    worker = settings.worker.model_copy(
        update={"group_id": f"{prefix}workers", "fcm_per_minute": 0, "apns_per_minute": 0}
    )
    pointed = point_at(
        settings,
        em.credentials,
        f"https://127.0.0.1:{em.fcm_port}",
        f"https://127.0.0.1:{em.apns_port}",
        DEFAULT_APNS_TOPIC,
    )
    fcm = pointed.fcm.model_copy(update={"implementation": "lean"})
    apns = pointed.apns.model_copy(update={"implementation": "lean"})
    database = settings.database.model_copy(update={"url": SecretStr(url)})
    logging = settings.logging.model_copy(update={"level": "WARNING", "format": "json"})
    return settings.model_copy(
        update={
            "kafka": kafka,
            "worker": worker,
            "fcm": fcm,
            "apns": apns,
            "database": database,
            "logging": logging,
        }
    )


@dataclass
class WorkerFigures:
    short: str
    where: str
    pages: float
    users: float
    rss_before_kb: int
    peak_rss_kb: int


@dataclass
class Broadcast:
    label: str
    users: int
    tokens: int
    progress: Progress
    stages: Samples
    workers: list[WorkerFigures]
    cores: CpuUse
    delivered: dict[str, Delivered] = field(default_factory=dict)
    exit_codes: list[int | None] = field(default_factory=list)

    @property
    def status(self) -> ledger.JobStatus:
        return self.progress.status

    @property
    def seconds(self) -> float:
        return self.progress.seconds

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def problems(self) -> list[str]:
        s = self.status
        out = []
        if s.state != "completed":
            out.append(f"ledger state {s.state}")
        if (s.sent, s.users_done) != (self.tokens, self.users):
            out.append(f"ledger sent {s.sent:,} of {self.tokens:,}, users {s.users_done:,}")
        if s.invalid or s.failed or s.retrying or s.suppressed or s.expired:
            out.append(
                f"ledger invalid {s.invalid} failed {s.failed} retrying {s.retrying}"
                f" suppressed {s.suppressed} expired {s.expired}"
            )
        total = sum(d.total for d in self.delivered.values())
        if total != self.tokens:
            out.append(f"emulators logged {total:,} deliveries of {self.tokens:,}")
        unique = sum(d.unique for d in self.delivered.values())
        if unique != self.tokens:
            out.append(f"emulators logged {unique:,} distinct tokens of {self.tokens:,}")
        if any(code != 0 for code in self.exit_codes):
            out.append(f"worker exit codes {self.exit_codes} after SIGTERM")
        return out


async def _until(
    what: str,
    check: Callable[[], Awaitable[object]],
    workers: Sequence[WorkerProcess],
    within: float,
) -> None:
    """Poll the coroutine function ``check`` until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        for w in workers:
            w.check_alive()
        if await check():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def warm_up(
    settings: Settings,
    conn: asyncpg.Connection,
    producer: AIOKafkaProducer,
    client: httpx.AsyncClient,
    workers: Sequence[WorkerProcess],
) -> int:
    """Single-user jobs on every partition, round after round, until every worker
    completed one in the same round: all have joined the group and hold partitions,
    their pools and HTTP/2 connections are open. Returns the rounds it took."""
    partitions = settings.kafka.topic_partitions
    tag = uuid.uuid4().hex[:6]

    async def completed_jobs() -> list[float]:
        return [
            summed(
                await scrape(client, w.metrics_port),
                "pushfan_worker_jobs_total",
                outcome="completed",
            )
            for w in workers
        ]

    for round_no in range(1, 21):
        before = await completed_jobs()
        ids: list[str] = []
        for p in range(partitions):
            job = news_job({"kind": "user", "user_id": WARM_USER}, f"warm-{tag}-{round_no}-{p}")
            await producer.send_and_wait(settings.kafka.topics.jobs, job.to_bytes(), partition=p)
            ids.append(job.job_id)

        async def all_done(ids: list[str] = ids) -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND state = 'completed'", ids
            )
            return bool(n == len(ids))

        await _until("the warm-up jobs", all_done, workers, 120)
        after = await completed_jobs()
        if all(a > b for a, b in zip(after, before, strict=True)):
            return round_no
    raise RuntimeError("the workers did not all get partitions of the jobs topic")


@dataclass
class Progress:
    status: ledger.JobStatus  # final
    seconds: float  # from the publish to the ledger's final state
    split_s: float | None  # to the split into shards
    marks: dict[int, float]  # percent of the users reported -> seconds


async def watch(
    conn: asyncpg.Connection,
    job_id: str,
    t0: float,
    users: int,
    workers: Sequence[WorkerProcess],
) -> Progress:
    """Poll the ledger every 20 ms until the job is in a final state."""
    split_s: float | None = None
    marks: dict[int, float] = {}
    deadline = time.monotonic() + max(600.0, users / 250)
    while True:
        status = await ledger.status(conn, job_id)
        now = time.perf_counter()
        if status is not None:
            if split_s is None and status.shards_total is not None:
                split_s = now - t0
            for pct in (50, 90):
                if pct not in marks and status.users_done * 100 >= users * pct:
                    marks[pct] = now - t0
            if status.state in ledger.FINAL_STATES:
                return Progress(status, now - t0, split_s, marks)
        for w in workers:
            w.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish")
        await asyncio.sleep(0.02)


async def broadcast(
    label: str,
    settings: Settings,
    conn: asyncpg.Connection,
    em: EmulatorProcess,
    segment: str,
    users: int,
    tokens: int,
    cpus: Sequence[Cpus],
    logdir: Path,
) -> Broadcast:
    """Start ``len(cpus)`` workers (each on its cpus), warm them up, time one broadcast
    to ``segment``, stop them."""
    await fresh_state(conn)
    await ensure_topics(settings.kafka)
    workers: list[WorkerProcess] = []
    try:
        for i, allowed in enumerate(cpus):
            name = f"{label}: worker {chr(ord('A') + i)}" if len(cpus) > 1 else f"{label}: worker"
            workers.append(start_worker(settings, name, allowed, logdir))
        async with httpx.AsyncClient(timeout=10) as client:

            async def serving() -> bool:
                try:
                    for w in workers:
                        await scrape(client, w.metrics_port)
                except httpx.HTTPError:
                    return False
                return True

            await _until("the workers' /metrics", serving, workers, 60)
            producer = make_producer(settings.kafka)
            await start_client(producer, settings.kafka)
            try:
                await warm_up(settings, conn, producer, client, workers)
                await reset_emulators(em)
                before = [await scrape(client, w.metrics_port) for w in workers]
                rss_before = [w.rss_kb() for w in workers]
                postmaster = await find_postmaster(settings.database.url.get_secret_value())
                named = {"emulators": em.proc.pid} | {w.short: w.pid for w in workers}
                meter = CpuMeter(named, postmaster)
                job = news_job(
                    {"kind": "segment", "segment": segment}, f"bench-fanout-{uuid.uuid4().hex[:8]}"
                )
                cpu_before = meter.sample()
                t0 = time.perf_counter()
                await producer.send_and_wait(
                    settings.kafka.topics.jobs, job.to_bytes(), key=job.job_id.encode()
                )
                progress = await watch(conn, job.job_id, t0, users, workers)
                cores = meter.use(cpu_before, meter.sample(), progress.seconds)
            finally:
                await producer.stop()
            after = [await scrape(client, w.metrics_port) for w in workers]
        figures = []
        deltas = [minus(a, b) for a, b in zip(after, before, strict=True)]
        for w, d, rss in zip(workers, deltas, rss_before, strict=True):
            figures.append(
                WorkerFigures(
                    w.short,
                    w.where,
                    summed(d, "pushfan_worker_pages_total"),
                    summed(d, "pushfan_worker_users_done_total"),
                    rss,
                    w.peak_rss_kb(),
                )
            )
    finally:
        for w in workers:
            w.stop()
    result = Broadcast(label, users, tokens, progress, plus(deltas), figures, cores)
    result.exit_codes = [w.exit_code for w in workers]
    result.delivered = {
        "android": await delivered(em, em.fcm_port),
        "ios": await delivered(em, em.apns_port),
    }
    return result


# --- output ----------------------------------------------------------------------------


def _mb(kb: int) -> str:
    return f"{kb / 1024:,.0f} MB"


def report(b: Broadcast, senders: Baseline, one: Broadcast | None = None) -> None:
    shards = b.status.shards_total or 0
    p = b.progress
    split = f", split in {p.split_s * 1000:,.0f} ms" if p.split_s is not None else ""
    split += "".join(f", {pct}% of the users by {t:.1f} s" for pct, t in p.marks.items())
    check = "; ".join(b.problems()) or (
        f"every token delivered exactly once, ledger completed with sent {b.status.sent:,}"
    )
    ratio = f"   ratio to the senders {b.rate / senders.rate:.2f}"
    speedup = f"   speed-up over 1 worker {b.rate / one.rate:.2f}x" if one else ""
    print(
        f"fanout {b.label:<10} {b.rate:>10,.0f} tokens/s end to end{ratio}{speedup}"
        f"   ({b.tokens:,} tokens of {b.users:,} users in {b.seconds:.2f} s, {shards} shards"
        f"{split}; {check})"
    )
    pages = summed(b.stages, "pushfan_worker_stage_seconds_count", stage="send") or 1.0
    per_page, per_token = [], []
    for stage in STAGES:
        total = summed(b.stages, "pushfan_worker_stage_seconds_sum", stage=stage)
        count = summed(b.stages, "pushfan_worker_stage_seconds_count", stage=stage) or 1.0
        per_page.append(f"{stage} {total / count * 1000:,.1f}")
        per_token.append(f"{stage} {total / b.tokens * 1e6:,.0f}")
    busy = sum(
        summed(b.stages, "pushfan_worker_stage_seconds_sum", stage=s) for s in ("send", "report")
    )
    commits = summed(b.stages, "pushfan_worker_stage_seconds_count", stage="commit")
    commit = ""
    if commits:
        total = summed(b.stages, "pushfan_worker_stage_seconds_sum", stage="commit")
        commit = f"; commit {total / commits * 1000:,.1f} ms per record ({commits:,.0f} records)"
    print(
        f"fanout {b.label:<10} stages, ms per page of {b.tokens / pages:,.0f} tokens:"
        f" {', '.join(per_page)}; summed over {pages:,.0f} pages, us per token:"
        f" {', '.join(per_token)}{commit}; {busy / b.seconds:.1f} pages in send+report at"
        " once on average (a lane's next page is resolved and queried during its send)"
    )
    for w in b.workers:
        print(
            f"fanout {b.label:<10} {w.short} on {w.where}: peak RSS {_mb(w.peak_rss_kb)}"
            f" (VmHWM; {_mb(w.rss_before_kb)} before the broadcast), {w.pages:,.0f} pages,"
            f" {w.users:,.0f} users"
        )
    worker_cores = sum(v for k, v in b.cores.procs.items() if k.startswith("worker"))
    cpu_us = worker_cores * b.seconds / b.tokens * 1e6
    alone = f" (the senders alone: {senders.cpu_us:,.0f})"
    print(
        f"fanout {b.label:<10} CPU (cores): {b.cores.line()};"
        f" worker CPU {cpu_us:,.0f} us/token{alone}"
    )


# --- the benchmark ---------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    everywhere: Cpus
    worker: Cpus  # the single worker (and the senders' baseline)
    pair: tuple[Cpus, Cpus]  # the two workers
    rest: int | None = None  # the emulators, this process, what the stack started here
    pinned: tuple[str, ...] = ()  # what the stack started here, on ``rest``

    def describe(self) -> str:
        if self.rest is None:
            return f"{len(self.everywhere)} core(s) or no taskset: nothing pinned"
        rest = ", ".join(("emulators", "this process", *self.pinned))
        a, b = self.pair
        return (
            f"{len(self.everywhere)} cores: one worker alone on {cpu_name(self.worker)};"
            f" {rest} on cpu {self.rest}; two workers on {cpu_name(a)} and {cpu_name(b)}"
        )


def placement(cpus: Cpus) -> Placement:
    if len(cpus) < 2 or not shutil.which("taskset"):
        return Placement(cpus, cpus, (cpus, cpus))
    # Two workers cannot have a core each here: both may run on every core, and the
    # scheduler places them (pinning both to one core would halve each; one on each
    # would put one on the emulators' core however busy it is).
    return Placement(cpus, cpus[:1], (cpus, cpus), cpus[-1])


@dataclass
class Baseline:
    """The lean senders' rate in the audience's mix, measured before and after the
    broadcasts (the machine drifts): their mean is what the broadcasts are compared with."""

    runs: list[Rate]

    @property
    def rate(self) -> float:
        return sum(r.rate for r in self.runs) / len(self.runs)

    @property
    def cpu_us(self) -> float:
        return sum(r.cpu_us for r in self.runs) / len(self.runs)


def print_senders(alone: list[Rate], base: Baseline, where: Placement) -> None:
    fcm, apns = alone
    runs = " and ".join(f"{r.rate:,.0f}" for r in base.runs)
    exact = all(r.exact for r in (*alone, *base.runs))
    print(
        f"fanout senders' own rate {base.rate:>10,.0f} msg/s   (FCM and APNs lean at once in"
        f" this mix: {runs}/s before and after the broadcasts, {base.runs[0].tokens:,} tokens"
        f" each time; alone: FCM {fcm.rate:,.0f}/s, APNs {apns.rate:,.0f}/s, {fcm.tokens:,}"
        f" tokens; this process on {cpu_name(where.worker)};"
        f" {'every token delivered once' if exact else 'NOT EVERY TOKEN DELIVERED ONCE'})"
    )
    print(
        "fanout senders' CPU      "
        + ", ".join(
            f"{r.cpu_us:,.0f} us/token (senders {r.client_cores:.2f} cores, emulators"
            f" {r.emulator_cores:.2f})"
            for r in base.runs
        )
    )


async def _broadcasts(
    settings: Settings,
    url: str,
    em: EmulatorProcess,
    users: int,
    sends: int,
    where: Placement,
    logdir: Path,
) -> tuple[Broadcast, Baseline]:
    """The senders' rate, then one worker and two on ``users`` users; printed."""
    conn = await asyncpg.connect(url)
    try:
        segment = f"bench-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        mix = await seed(conn, users, segment)
        tokens = sum(mix.values())
        print(
            f"fanout: {users:,} users, {tokens:,} tokens ({mix['android']:,} android +"
            f" {mix['ios']:,} ios) in segment {segment}, COPY + VACUUM in"
            f" {time.perf_counter() - t0:.1f} s; pages of {settings.worker.page_size},"
            f" shards of {settings.worker.shard_pages} pages,"
            f" {settings.kafka.topic_partitions} partitions; {where.describe()}"
        )
        n_fcm = round(2 * sends * mix["android"] / tokens)
        alone = [
            await lean_rate(em, sends, 0, where.worker),
            await lean_rate(em, 0, sends, where.worker),
        ]
        base = Baseline([await lean_rate(em, n_fcm, 2 * sends - n_fcm, where.worker)])
        one = await broadcast(
            "1 worker",
            phase_settings(settings, url, em, "one"),
            conn,
            em,
            segment,
            users,
            tokens,
            [where.worker],
            logdir,
        )
        two = await broadcast(
            "2 workers",
            phase_settings(settings, url, em, "two"),
            conn,
            em,
            segment,
            users,
            tokens,
            list(where.pair),
            logdir,
        )
        base.runs.append(await lean_rate(em, n_fcm, 2 * sends - n_fcm, where.worker))
    finally:
        await conn.close()
    print_senders(alone, base, where)
    report(one, base)
    report(two, base, one)
    print(
        f"fanout: 2 workers / 1 worker {two.rate / one.rate:.2f}x on {len(where.everywhere)} cores"
        " shared by the workers, the emulators, PostgreSQL and the broker: what this machine"
        " allows, not how the worker scales"
    )
    return one, base


async def _big(
    settings: Settings,
    url: str,
    em: EmulatorProcess,
    where: Placement,
    logdir: Path,
    one: Broadcast,
    base: Baseline,
) -> None:
    """One worker, :data:`BIG_USERS` users: its peak RSS against the smaller broadcast's."""
    conn = await asyncpg.connect(url)
    try:
        segment = f"bench-big-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        mix = await seed(conn, BIG_USERS, segment)
        print(f"fanout big: {BIG_USERS:,} users seeded in {time.perf_counter() - t0:.1f} s")
        big = await broadcast(
            "1M users",
            phase_settings(settings, url, em, "big"),
            conn,
            em,
            segment,
            BIG_USERS,
            sum(mix.values()),
            [where.worker],
            logdir,
        )
    finally:
        await conn.close()
    report(big, base)
    peak = big.workers[0].peak_rss_kb / 1024
    print(
        f"fanout big: peak RSS {peak:,.0f} MB for {big.users:,} users against"
        f" {one.workers[0].peak_rss_kb / 1024:,.0f} MB for {one.users:,} (target: under"
        f" {RSS_TARGET_MB} MB, {'met' if peak < RSS_TARGET_MB else 'NOT MET'})"
    )


async def _bench(
    settings: Settings,
    url: str,
    big_url: str | None,
    em: EmulatorProcess,
    users: int,
    sends: int,
    where: Placement,
    logdir: Path,
) -> None:
    one, base = await _broadcasts(settings, url, em, users, sends, where, logdir)
    if big_url is not None:
        await _big(settings, big_url, em, where, logdir, one, base)


def run(stack: Stack, settings: Settings, users: int, sends: int, *, big: bool = False) -> None:
    """The fanout benchmark on ``stack``'s broker, in fresh databases on its server."""
    url = stack.database.create_sibling("pushfan_bench_fanout")
    big_url = stack.database.create_sibling("pushfan_bench_big") if big else None
    asyncio.run(migrate(url))
    if big_url is not None:
        asyncio.run(migrate(big_url))
    everywhere = os.sched_getaffinity(0)
    where = placement(tuple(sorted(everywhere)))
    # What the stack started here (an embedded PostgreSQL, the Tansu broker) moves off
    # the worker's core, as servers of their own would not share it; this process too.
    postmaster = asyncio.run(find_postmaster(url)) if stack.database.kind == "embedded" else None
    broker = tansu_pid() if stack.broker.kind == "tansu" else None
    if where.rest is not None:
        pinned = ("PostgreSQL",) if postmaster is not None else ()
        where = replace(where, pinned=pinned + (("the broker",) if broker is not None else ()))
    logdir = Path(tempfile.mkdtemp(prefix="pushfan-bench-fanout-"))
    em = start_emulator_process(where.rest)
    try:
        if where.rest is not None:
            if postmaster is not None:
                pin_tree(postmaster, {where.rest})
            if broker is not None:
                pin_threads(broker, {where.rest})
            os.sched_setaffinity(0, {where.rest})
        asyncio.run(_bench(settings, url, big_url, em, users, sends, where, logdir))
    finally:
        os.sched_setaffinity(0, everywhere)
        if postmaster is not None:
            pin_tree(postmaster, everywhere)
        if broker is not None:
            pin_threads(broker, everywhere)
        em.stop()
        shutil.rmtree(logdir, ignore_errors=True)
