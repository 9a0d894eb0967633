"""Sender throughput against the emulators, with the client libraries as baselines.

The emulators run in their own process (``pushfan emulators``) on one core and the
senders in this process on the other, where the machine has two. Each sender sends to
distinct well-formed tokens; the emulators' delivery log is read back to check that every
token was delivered exactly once (a rate means nothing if messages were lost).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from pushfan.emulators.credentials import Credentials
from pushfan.emulators.runner import emulators_command, read_announcement
from schemas import NotificationJob
from worker.render import render_apns, render_fcm
from worker.senders.apns import ApnsSender, ProviderToken
from worker.senders.base import OutcomeKind
from worker.senders.fcm import FcmSender, TokenSource, static_credentials
from worker.senders.h2client import H2Pool

STATIC_TOKEN = "pushfan-emulator-token"
TOPIC = "com.example.pushfan"


@dataclass
class EmulatorProcess:
    proc: subprocess.Popen[str]
    state_dir: Path
    fcm_port: int
    apns_port: int

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.state_dir)

    def deliveries(self, port: int) -> int:
        ca = str(self.credentials.ca_file)
        with httpx.Client(verify=ca) as client:
            total: int = client.get(f"https://127.0.0.1:{port}/_emulator/deliveries").json()[
                "total"
            ]
            client.post(f"https://127.0.0.1:{port}/_emulator/reset")
            return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def start_emulator_process(cpu: int | None) -> EmulatorProcess:
    state = Path(tempfile.mkdtemp(prefix="pushfan-bench-em-"))
    cmd = emulators_command(state)
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = {**os.environ, "PUSHFAN_LOGGING__LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    try:
        _, fcm_url, apns_url = read_announcement(proc.stdout)
    except RuntimeError:
        proc.kill()
        raise
    return EmulatorProcess(proc, state, urlsplit(fcm_url).port or 0, urlsplit(apns_url).port or 0)


def sender_job() -> NotificationJob:
    """The job every sender benchmark renders (a title, a body and one data field)."""
    now = datetime.now(UTC)
    return NotificationJob.model_validate(
        {
            "job_id": "bench-senders",
            "type": "news",
            "audience": {"kind": "all"},
            "payload": {"title": "Breaking", "body": "Something happened.", "data": {"k": "v"}},
            "created_at": now,
            "expires_at": now + timedelta(hours=1),
        }
    )


def fcm_tokens(n: int) -> list[str]:
    return [f"bench{i:012d}:APA91b{'x' * 120}" for i in range(n)]


def apns_tokens(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


async def timed(
    n: int, batch: int, send: Callable[[list[str]], Awaitable[int]], tokens: list[str]
) -> tuple[float, int]:
    """``tokens[:n]`` through ``send`` in batches: seconds taken, and what ``send`` counted."""
    t0 = time.perf_counter()
    delivered = 0
    for i in range(0, n, batch):
        delivered += await send(tokens[i : i + batch])
    return time.perf_counter() - t0, delivered


async def lean_fcm(em: EmulatorProcess, n: int) -> tuple[float, int]:
    creds = em.credentials
    pool = H2Pool("127.0.0.1", em.fcm_port, ssl_context=creds.client_ssl_context())
    source = TokenSource(static_credentials(STATIC_TOKEN), refreshable=False)
    sender = FcmSender(pool, creds.fcm_project_id, source)
    message = render_fcm(sender_job())

    async def send(tokens: list[str]) -> int:
        outcomes = await sender.send(tokens, message)
        return sum(o.kind is OutcomeKind.DELIVERED for o in outcomes)

    try:
        return await timed(n, 1000, send, fcm_tokens(n))
    finally:
        await sender.close()


async def lean_apns(em: EmulatorProcess, n: int) -> tuple[float, int]:
    creds = em.credentials
    pool = H2Pool("127.0.0.1", em.apns_port, ssl_context=creds.client_ssl_context())
    token = ProviderToken(creds.apns_key_file.read_text(), creds.apns_key_id, creds.apns_team_id)
    sender = ApnsSender(pool, token)
    message = render_apns(sender_job(), topic=TOPIC)

    async def send(tokens: list[str]) -> int:
        outcomes = await sender.send(tokens, message)
        return sum(o.kind is OutcomeKind.DELIVERED for o in outcomes)

    try:
        return await timed(n, 1000, send, apns_tokens(n))
    finally:
        await sender.close()


async def sdk_fcm(em: EmulatorProcess, n: int) -> tuple[float, int]:
    import firebase_admin
    from firebase_admin import messaging

    os.environ["SSL_CERT_FILE"] = str(em.credentials.ca_file)
    messaging._MessagingService.FCM_URL = (
        f"https://127.0.0.1:{em.fcm_port}/v1/projects/{{0}}/messages:send"
    )
    app = firebase_admin.initialize_app(
        static_credentials(STATIC_TOKEN),
        {"projectId": em.credentials.fcm_project_id},
        name=f"bench-{n}",
    )

    async def send(tokens: list[str]) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # tokens= is deprecated in 7.x
            batch = messaging.MulticastMessage(
                tokens=tokens,
                notification=messaging.Notification("Breaking", "Something happened."),
            )
        result = await messaging.send_each_for_multicast_async(batch, app=app)
        return int(result.success_count)

    return await timed(n, 500, send, fcm_tokens(n))


async def sdk_apns(em: EmulatorProcess, n: int) -> tuple[float, int]:
    from aioapns import APNs, NotificationRequest
    from aioapns.connection import APNsProductionClientProtocol

    creds = em.credentials

    class Local(APNsProductionClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = em.apns_port

    client = APNs(
        key=creds.apns_key_file.read_text(),
        key_id=creds.apns_key_id,
        team_id=creds.apns_team_id,
        topic=TOPIC,
        use_sandbox=False,
        ssl_context=creds.client_ssl_context(),
    )
    client.pool.protocol_class = Local
    payload = {"aps": {"alert": {"title": "Breaking", "body": "Something happened."}}}

    async def send(tokens: list[str]) -> int:
        results = await asyncio.gather(
            *(
                client.send_notification(NotificationRequest(device_token=t, message=payload))
                for t in tokens
            )
        )
        return sum(r.is_successful for r in results)

    return await timed(n, 1000, send, apns_tokens(n))


def run(n: int, baseline_n: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    em = start_emulator_process(cpus[-1] if len(cpus) > 1 else None)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[0]})
    try:
        rows = []
        for name, fn, count, port in (
            ("FCM lean", lean_fcm, n, em.fcm_port),
            ("FCM firebase-admin", sdk_fcm, baseline_n, em.fcm_port),
            ("APNs lean", lean_apns, n, em.apns_port),
            ("APNs aioapns", sdk_apns, baseline_n, em.apns_port),
        ):
            seconds, ok = asyncio.run(fn(em, count))
            logged = em.deliveries(port)
            rows.append((name, count / seconds, ok, logged, count))
        fcm_ratio = rows[0][1] / rows[1][1]
        apns_ratio = rows[2][1] / rows[3][1]
        for name, rate, ok, logged, count in rows:
            exact = (
                "exactly once" if ok == logged == count else f"{ok} ok, {logged} logged of {count}"
            )
            print(f"sender {name:<20} {rate:>10,.0f} msg/s   ({count:,} tokens, {exact})")
        print(
            f"sender ratios: FCM lean / firebase-admin {fcm_ratio:.1f}x,"
            f" APNs lean / aioapns {apns_ratio:.1f}x"
        )
    finally:
        em.stop()
        os.sched_setaffinity(0, set(cpus))


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000, 2_000)
