"""Where each process runs and what CPU it used: the placement on the machine's cores,
pinning what the stack started here, and CPU seconds by process and by cpu from ``/proc``."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass

Cpus = tuple[int, ...]


def cpu_name(cpus: Cpus) -> str:
    return f"cpu {cpus[0]}" if len(cpus) == 1 else f"cpus {','.join(map(str, cpus))}"


def cpu_ticks(pid: int, *, reaped: bool = False) -> int:
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

    def busy(self) -> str:
        """Each cpu's busy share, e.g. ``cpu0 45%, cpu1 60%``."""
        return ", ".join(f"{k} {v:.0%}" for k, v in self.cpus.items())

    def line(self) -> str:
        procs = ", ".join(f"{k} {v:.2f}" for k, v in self.procs.items())
        return f"{procs}; busy {self.busy()}"


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
                out[name] = cpu_ticks(pid) / self.hz
        if self.postmaster is not None:
            with contextlib.suppress(OSError):
                ticks = cpu_ticks(self.postmaster, reaped=True)
                for child in _children(self.postmaster):
                    with contextlib.suppress(OSError):
                        ticks += cpu_ticks(child, reaped=True)
                out["PostgreSQL"] = ticks / self.hz
        if self.broker is not None:
            with contextlib.suppress(OSError):
                out["broker"] = cpu_ticks(self.broker) / self.hz
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
