"""The HTTP/2 senders against nghttpd: the lean pool, the ``h2``-library pool, the SDKs.

``make bench ARGS="--only h2"``. nghttpd, a C server, answers every send with a canned
200 (``bench/nghttpd.py``) on one core; each client runs on the other core, in a process
of its own, one after another:

- ``h2load``, nghttp2's C load generator, with the senders' connections (one h2load
  process each, every request a path of its own), streams, headers and bodies: what the
  server sustains when the client costs next to nothing;
- each sender as a worker builds it (``worker.senders.factory`` from the settings
  ``PUSHFAN_FCM__IMPLEMENTATION`` / ``PUSHFAN_APNS__IMPLEMENTATION``: ``lean``, ``h2``,
  ``sdk``, defaults otherwise), sending distinct tokens in batches of 1000 through
  ``Sender.send`` after a warm-up batch of other tokens.

Per client: messages a second; CPU per message (the process's CPU time over the measured
messages, its threads included); the outcomes counted (every message answered 200, or
what else came back); its share of its core and the share other processes took (on a
shared machine they take some, and the rate drops while CPU a message holds); and how
busy nghttpd's core was: well below 100%, the server was not the limit. Ratios are of
rates, and of CPU a message, which other processes disturb less.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fanout.cpus import cpu_ticks
from bench.nghttpd import (
    Nghttpd,
    canned_docroot,
    docroot_parent,
    fcm_path,
    start_nghttpd,
    version,
)
from bench.senders import STATIC_TOKEN, TOPIC, apns_tokens, fcm_tokens, sender_job, timed
from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.logs import configure_logging
from pushfan.settings import LoggingSettings, load_settings
from schemas import Platform
from worker.render import fcm_bodies, render_apns, render_fcm
from worker.senders.apns import ProviderToken
from worker.senders.apns_sdk import ApnsSdkSender
from worker.senders.base import Message, OutcomeKind, Sender
from worker.senders.factory import build_senders

BATCH = 1000  # tokens per Sender.send, as the worker's pages
WARMUP = 1000  # tokens sent before the clock starts: connections, first signatures
CONNECTIONS, STREAMS = 4, 100  # the pools' defaults; nghttpd's stream limit
ROOT = Path(__file__).resolve().parents[1]  # where ``python -m bench.h2`` finds bench/
NAMES = {"lean": "lean", "h2": "h2 library", "sdk-fcm": "firebase-admin", "sdk-apns": "aioapns"}


@dataclass
class Result:
    name: str
    count: int
    seconds: float
    cpu_s: float  # the client's CPU time over the measured messages
    outcomes: dict[str, int]  # "200" for delivered, else kind:reason
    server_busy: float  # nghttpd's share of its core meanwhile
    core_busy: float  # how busy the client's core was meanwhile, whoever used it
    span_s: float = 0.0  # what cpu_s and core_busy cover, when more than ``seconds``

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def line(self) -> str:
        ok = self.outcomes.get("200", 0)
        answered = (
            f"all {ok:,} answered 200"
            if ok == self.count
            else f"{ok:,} of {self.count:,} answered 200, {self._others()}"
        )
        own = self.cpu_s / max(self.seconds, self.span_s)
        others = max(0.0, self.core_busy - own)
        return (
            f"{self.name:<19} {self.rate:>8,.0f} msg/s {self.cpu_s / self.count * 1e6:>6,.0f} us"
            f" CPU/msg  {answered}; client {own:.0%} of its core, other processes"
            f" {others:.0%}; nghttpd {self.server_busy:.0%} of its core"
        )

    def _others(self) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in sorted(self.outcomes.items()) if k != "200")


# -- in the sender's own process ----------------------------------------------------------


def core_ticks(cpu: int | None) -> tuple[int, int]:
    """Busy and all ticks of ``cpu`` so far (``/proc/stat``; the whole machine: None)."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == name:
                t = [int(x) for x in parts[1:9]]  # ... idle iowait ...
                return sum(t) - t[3] - t[4], sum(t)
    raise RuntimeError(f"{name} not in /proc/stat")


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def rendered(platform: Platform) -> Message:
    return (
        render_fcm(sender_job())
        if platform == "android"
        else render_apns(sender_job(), topic=TOPIC)
    )


def fit_aioapns_to_nghttpd(sender: Sender) -> None:
    """aioapns against nghttpd: it offers no ALPN, which nghttpd requires, and it finds a
    request by the ``apns-id`` APNs echoes in every answer, which nghttpd does not; an
    empty body arrives as an empty DATA frame, which aioapns would parse as JSON. The
    shim does what the real APNs would: ALPN h2, the id added, the empty frame dropped."""
    from h2.events import DataReceived, ResponseReceived

    pool = sender.client.pool  # type: ignore[attr-defined]
    pool.ssl_context.set_alpn_protocols(["h2"])
    base = pool.protocol_class

    class Echoing(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            receive = self.conn.receive_data

            def with_ids(data: bytes) -> list[Any]:
                events = receive(data)
                for event in events:
                    if isinstance(event, ResponseReceived):
                        ids = self.request_streams.get(event.stream_id, "")
                        event.headers.append((b"apns-id", ids.encode()))
                return [e for e in events if not (isinstance(e, DataReceived) and not e.data)]

            self.conn.receive_data = with_ids

    pool.protocol_class = Echoing


async def _measure(platform: Platform, n: int, server_pid: int) -> dict[str, Any]:
    sender = build_senders(load_settings(), (platform,))[platform]
    if isinstance(sender, ApnsSdkSender):
        fit_aioapns_to_nghttpd(sender)
    message = rendered(platform)
    tokens = (fcm_tokens if platform == "android" else apns_tokens)(n + WARMUP)
    outcomes: Counter[str] = Counter()

    async def send(batch: list[str]) -> int:
        for o in await sender.send(batch, message):
            outcomes["200" if o.kind is OutcomeKind.DELIVERED else f"{o.kind}:{o.reason}"] += 1
        return 0

    hz = os.sysconf("SC_CLK_TCK")
    mine = os.sched_getaffinity(0)
    core = next(iter(mine)) if len(mine) == 1 else None
    try:
        await send(tokens[n:])  # the warm-up, on tokens not measured
        outcomes.clear()
        server0, cpu0, core0 = cpu_ticks(server_pid), time.process_time(), core_ticks(core)
        seconds, _ = await timed(n, BATCH, send, tokens[:n])
        cpu = time.process_time() - cpu0
        busy = (cpu_ticks(server_pid) - server0) / hz / seconds
        core_busy = busy_share(core0, core_ticks(core))
    finally:
        await sender.close()
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "outcomes": outcomes,
        "server_busy": busy,
        "core_busy": core_busy,
    }


def _child(argv: list[str]) -> None:
    """``python -m bench.h2 PLATFORM N SERVER_PID``: one sender, the result as JSON."""
    configure_logging(LoggingSettings(level="WARNING"))
    platform, n, server_pid = argv[0], int(argv[1]), int(argv[2])
    assert platform in ("android", "ios")
    print(json.dumps(asyncio.run(_measure(platform, n, server_pid))))  # type: ignore[arg-type]


# -- in the bench's process ---------------------------------------------------------------


def _pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None else cmd


def _settings_env(server: Nghttpd, creds: Credentials, service: str, impl: str) -> dict[str, str]:
    """The environment that points a worker's sender of ``service`` at nghttpd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHFAN_")}
    env["PUSHFAN_LOGGING__LEVEL"] = "WARNING"
    common = {"IMPLEMENTATION": impl, "ENDPOINT": server.url, "CA_FILE": str(creds.ca_file)}
    if service == "fcm":
        own = {"PROJECT_ID": creds.fcm_project_id, "ACCESS_TOKEN": STATIC_TOKEN}
    else:
        own = {
            "KEY_FILE": str(creds.apns_key_file),
            "KEY_ID": creds.apns_key_id,
            "TEAM_ID": creds.apns_team_id,
            "TOPIC": TOPIC,
        }
    env.update({f"PUSHFAN_{service.upper()}__{k}": v for k, v in {**common, **own}.items()})
    return env


def run_sender(
    server: Nghttpd, creds: Credentials, service: str, impl: str, n: int, cpu: int | None
) -> Result:
    platform = "android" if service == "fcm" else "ios"
    cmd = _pinned([sys.executable, "-m", "bench.h2", platform, str(n), str(server.pid)], cpu)
    env = _settings_env(server, creds, service, impl)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{service} {impl} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    name = f"{'FCM' if service == 'fcm' else 'APNs'} {NAMES.get(impl, NAMES[f'sdk-{service}'])}"
    return Result(name, n, **out)


def connection_paths(paths: list[str], n: int, connections: int) -> list[tuple[int, list[str]]]:
    """``n`` requests over at most ``connections``: each connection's count and its own
    paths, every path of ``paths`` once over all of them (one path: the same for every
    request)."""
    counts = [n // connections + (k < n % connections) for k in range(min(n, connections))]
    if len(paths) == 1:
        return [(count, paths) for count in counts]
    if len(paths) != n:
        raise ValueError(f"{len(paths)} paths for {n} requests")
    return [(count, paths[k::connections]) for k, count in enumerate(counts)]


def run_h2load(
    server: Nghttpd, creds: Credentials, service: str, n: int, cpu: int | None, work: Path
) -> Result:
    """h2load with what the lean sender of ``service`` sends: its headers, bodies, paths.

    One h2load process a connection, all at once on ``cpu``, each with paths of its own:
    h2load's clients all take their paths from the top of one list, so with four
    connections nghttpd would meet every APNs path four times at once and open its file
    only once (it keeps a file open while a stream reads it): measured, 12,500 opens for
    50,000 requests, a quarter of the server's real work."""
    if service == "fcm":
        message = rendered("android")
        auth = f"Bearer {STATIC_TOKEN}"
        body = fcm_bodies(message, fcm_tokens(1))[0]
        paths = [fcm_path(creds.fcm_project_id)]
    else:
        message = rendered("ios")
        key = creds.apns_key_file.read_text()
        auth = f"bearer {ProviderToken(key, creds.apns_key_id, creds.apns_team_id).current()}"
        body = message.body
        paths = [f"/3/device/{t}" for t in apns_tokens(n)]
    (work / f"{service}.body").write_bytes(body)
    headers = [f"{k}: {v}" for k, v in (("authorization", auth), *message.headers)]
    cmds = []
    for k, (count, mine) in enumerate(connection_paths(paths, n, CONNECTIONS)):
        uris = work / f"{service}-{k}.uris"
        uris.write_text("".join(f"{server.url}{p}\n" for p in mine))
        cmd = ["h2load", "-n", str(count), "-c", "1", "-m", str(STREAMS), "-t", "1"]
        cmd += ["-d", str(work / f"{service}.body"), "-i", str(uris)]
        cmds.append(_pinned(cmd + [a for h in headers for a in ("-H", h)], cpu))
    hz = os.sysconf("SC_CLK_TCK")
    server0, core0, t0 = cpu_ticks(server.pid), core_ticks(cpu), time.perf_counter()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds
    ]
    try:
        outputs = [(p.communicate(timeout=600), p.returncode) for p in procs]
    finally:  # one timed out: stop the others too
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    busy = (cpu_ticks(server.pid) - server0) / hz / wall
    core_busy = busy_share(core0, core_ticks(cpu))
    cpu_s = sum(getattr(children, f) - getattr(children0, f) for f in ("ru_utime", "ru_stime"))
    seconds, ok = 0.0, 0
    for (stdout, stderr), code in outputs:
        finished = re.search(r"finished in ([\d.]+)(m?s),", stdout)
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout)
        if code != 0 or finished is None or codes is None:
            raise RuntimeError(f"h2load failed:\n{stdout[-2000:]}{stderr[-2000:]}")
        seconds = max(seconds, float(finished[1]) / (1000 if finished[2] == "ms" else 1))
        ok += int(codes[1])
    outcomes = {"200": ok, **({"not 2xx or no answer": n - ok} if ok != n else {})}
    name = f"{'FCM' if service == 'fcm' else 'APNs'} h2load"
    # Its CPU and the cores' shares cover the whole processes (their start, reading the URIs).
    return Result(name, n, seconds, cpu_s, outcomes, busy, core_busy, span_s=wall)


def run(n: int, sdk_n: int) -> None:
    if not shutil.which("h2load"):
        raise RuntimeError("h2load not found: apt-get install nghttp2-client")
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[-1], cpus[0]) if len(cpus) > 1 else (None, None)
    where = (
        f"nghttpd on cpu {server_cpu}, one client at a time on cpu {client_cpu}"
        if server_cpu is not None
        else "one core: nothing pinned"
    )
    with tempfile.TemporaryDirectory(prefix="pushfan-bench-h2-", dir=docroot_parent()) as tmp:
        work = Path(tmp)
        # No OAuth2 token endpoint here: FCM senders use a static access token.
        creds = ensure_credentials(work / "credentials", token_uri="https://127.0.0.1:9/token")
        docroot = canned_docroot(
            work / "docroot",
            fcm_project=creds.fcm_project_id,
            apns_tokens=apns_tokens(max(n, sdk_n) + WARMUP),
        )
        with start_nghttpd(creds, docroot, cpu=server_cpu, max_concurrent_streams=STREAMS) as ng:
            print(
                f"h2 senders: {version()} answering 200 ({STREAMS} streams a connection),"
                f" {where}; {n:,} tokens a sender, {sdk_n:,} for the SDKs"
            )
            rows: dict[tuple[str, str], Result] = {}
            for service in ("fcm", "apns"):
                rows[service, "h2load"] = run_h2load(ng, creds, service, n, client_cpu, work)
                for impl, count in (("lean", n), ("h2", n), ("sdk", sdk_n)):
                    rows[service, impl] = run_sender(ng, creds, service, impl, count, client_cpu)
    for result in rows.values():
        print(result.line())
    for service, sdk in (("fcm", "firebase-admin"), ("apns", "aioapns")):
        lean = rows[service, "lean"]
        h2, baseline = _ratio(lean, rows[service, "h2"]), _ratio(lean, rows[service, "sdk"])
        tool = lean.rate / rows[service, "h2load"].rate
        print(
            f"{'FCM' if service == 'fcm' else 'APNs'} ratios by rate: lean / h2 library {h2},"
            f" lean / {sdk} {baseline}, lean / h2load {tool:.2f}"
        )


def _ratio(lean: Result, other: Result) -> str:
    by_cpu = (other.cpu_s / other.count) / (lean.cpu_s / lean.count)
    return f"{lean.rate / other.rate:.1f}x (by CPU a message {by_cpu:.1f}x)"


if __name__ == "__main__":
    _child(sys.argv[1:])
