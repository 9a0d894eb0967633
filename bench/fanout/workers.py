"""``pushfan worker`` processes: started pinned, configured only by ``PUSHFAN_*``
variables, stopped gracefully; their peak RSS from ``/proc``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.fanout.cpus import Cpus, cpu_name
from pushfan.settings import Settings, subprocess_env
from pushfan.stack import free_port

ROOT = Path(__file__).resolve().parents[2]


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
        """Its name in the output, what follows the phase's label in ``name``: worker, or
        worker A and worker B."""
        return self.name.rpartition(": ")[2]

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
    profile_dir = os.environ.get("BENCH_PROFILE_DIR")
    if profile_dir:
        out = Path(profile_dir) / f"{name.replace(' ', '-').replace(':', '')}.prof"
        cmd[1:1] = ["-m", "cProfile", "-o", str(out)]
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
    spy_dir = os.environ.get("BENCH_PYSPY_DIR")
    if spy_dir and shutil.which("py-spy"):
        # Sampling rather than tracing: the profile keeps the worker's own proportions.
        out = Path(spy_dir) / f"{name.replace(' ', '-').replace(':', '').replace(',', '')}.txt"
        spy = ["py-spy", "record", "--pid", str(proc.pid), "--format", "raw", "--rate", "250"]
        subprocess.Popen(
            [*spy, "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return WorkerProcess(name, proc, port, cpu_name(cpus), log_path, log)
