"""One timed broadcast: a phase's settings, its workers started and warmed up, one
segment job published and watched to the end, and what it came to."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
from pydantic import SecretStr

from bench.cpu import find_postmaster
from bench.fanout.cpus import CpuMeter, Cpus, CpuUse
from bench.fanout.emulators import Delivered, delivered, reset_emulators
from bench.fanout.jobs import Progress, news_job, until, warm_up, watch
from bench.fanout.metrics import Samples, minus, plus, scrape, summed
from bench.fanout.seed import fresh_state
from bench.fanout.workers import WorkerProcess, start_worker
from bench.senders import EmulatorProcess
from pushfan.emulators.credentials import Credentials
from pushfan.emulators.runner import DEFAULT_APNS_TOPIC, point_at
from pushfan.kafka import ensure_topics, make_producer, start_client
from pushfan.settings import Settings, TopicSettings
from worker import status as job_status


@dataclass(frozen=True)
class Server:
    """What a phase's workers send to: the emulator process, or nghttpd (which keeps no
    log of what it answered, so only the ledger checks its deliveries)."""

    name: str
    pid: int
    credentials: Credentials
    fcm_url: str
    apns_url: str
    em: EmulatorProcess | None = None

    @classmethod
    def emulators(cls, em: EmulatorProcess) -> Server:
        return cls(
            "emulators",
            em.proc.pid,
            em.credentials,
            f"https://127.0.0.1:{em.fcm_port}",
            f"https://127.0.0.1:{em.apns_port}",
            em,
        )


def phase_settings(
    settings: Settings,
    url: str,
    server: EmulatorProcess | Server,
    tag: str,
    *,
    in_flight: int | None = None,
    implementation: str = "lean",
) -> Settings:
    """``settings`` for one phase: its own topics and group, the fresh database, the
    server (the emulator process by default), no FCM rate limit; with ``in_flight``, each
    sender's concurrency (requests in flight per platform per worker); the senders'
    ``implementation``."""
    if not isinstance(server, Server):
        server = Server.emulators(server)
    prefix = f"bench-fanout-{tag}-{uuid.uuid4().hex[:6]}."
    kafka = settings.kafka.model_copy(update={"topics": TopicSettings.prefixed(prefix)})
    worker = settings.worker.model_copy(
        update={"group_id": f"{prefix}workers", "fcm_per_minute": 0, "apns_per_minute": 0}
    )
    pointed = point_at(
        settings, server.credentials, server.fcm_url, server.apns_url, DEFAULT_APNS_TOPIC
    )
    senders: dict[str, object] = {"implementation": implementation}
    if in_flight is not None:
        senders["concurrency"] = in_flight
    fcm = pointed.fcm.model_copy(update=senders)
    apns = pointed.apns.model_copy(update=senders)
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
    def status(self) -> job_status.JobStatus:
        return self.progress.status

    @property
    def seconds(self) -> float:
        return self.progress.seconds

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def worker_cores(self) -> float:
        """Cores the workers used together during the broadcast."""
        return sum(v for k, v in self.cores.procs.items() if k.startswith("worker"))

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
        # A server without a log (nghttpd): the ledger's counts above are the check.
        if self.delivered:
            total = sum(d.total for d in self.delivered.values())
            if total != self.tokens:
                out.append(f"emulators logged {total:,} deliveries of {self.tokens:,}")
            unique = sum(d.unique for d in self.delivered.values())
            if unique != self.tokens:
                out.append(f"emulators logged {unique:,} distinct tokens of {self.tokens:,}")
        if any(code != 0 for code in self.exit_codes):
            out.append(f"worker exit codes {self.exit_codes} after SIGTERM")
        return out


async def broadcast(
    label: str,
    settings: Settings,
    conn: asyncpg.Connection,
    target: EmulatorProcess | Server,
    segment: str,
    users: int,
    tokens: int,
    cpus: Sequence[Cpus],
    logdir: Path,
    *,
    script: Mapping[str, object] | None = None,
    platforms: Sequence[str] | None = None,
) -> Broadcast:
    """Start ``len(cpus)`` workers (each on its cpus), warm them up, time one broadcast
    to ``segment`` (its ``platforms`` only, when given: ``tokens`` must count those),
    stop them. ``script`` scripts the emulators for the timed broadcast only (the warm-up
    runs unscripted); reading their logs afterwards resets them."""
    server = target if isinstance(target, Server) else Server.emulators(target)
    em = server.em
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

            await until("the workers' /metrics", serving, workers, 60)
            producer = make_producer(settings.kafka)
            await start_client(producer, settings.kafka)
            try:
                await warm_up(settings, conn, producer, client, workers)
                if em is not None:
                    await reset_emulators(em, script)
                before = [await scrape(client, w.metrics_port) for w in workers]
                rss_before = [w.rss_kb() for w in workers]
                postmaster = await find_postmaster(settings.database.url.get_secret_value())
                named = {server.name: server.pid} | {w.short: w.pid for w in workers}
                meter = CpuMeter(named, postmaster)
                job = news_job(
                    {"kind": "segment", "segment": segment},
                    f"bench-fanout-{uuid.uuid4().hex[:8]}",
                    platforms,
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
    if em is not None:
        result.delivered = {
            "android": await delivered(em, em.fcm_port),
            "ios": await delivered(em, em.apns_port),
        }
    return result
