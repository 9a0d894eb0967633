"""CPU seconds by process during a benchmark phase, and pinning processes to cores.

Read from ``/proc``: the API process, PostgreSQL when it runs on this machine (its
postmaster and every child) and the load generator, and the rest of the machine as
``other``, which should be near 0 for the figures to mean anything.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

import asyncpg


class _Measured(Protocol):
    cpu: dict[str, float]  # cores used, by process


M = TypeVar("M", bound=_Measured)


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

    async def measure(self, phase: Coroutine[Any, Any, M]) -> M:
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
