"""The emulator process as the benchmark uses it: its delivery log, resets, and the lean
senders' own rate against it (the baseline of the end-to-end ratio)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from bench.fanout.cpus import Cpus, cpu_ticks
from bench.senders import EmulatorProcess, lean_apns, lean_fcm


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


async def reset_emulators(em: EmulatorProcess, script: Mapping[str, object] | None = None) -> None:
    """Forget both emulators' scripting and delivery logs; then, given ``script`` (the
    control API's JSON, e.g. ``{"latency_ms": 100}``), script both with it. Raises
    ``httpx.HTTPStatusError`` when an emulator refuses the script."""
    async with httpx.AsyncClient(verify=str(em.credentials.ca_file)) as client:
        for port in (em.fcm_port, em.apns_port):
            base = f"https://127.0.0.1:{port}/_emulator"
            (await client.post(f"{base}/reset")).raise_for_status()
            if script:
                (await client.put(f"{base}/script", json=dict(script))).raise_for_status()


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
        t0, cpu0, em0 = time.perf_counter(), time.process_time(), cpu_ticks(em.proc.pid)
        results = await asyncio.gather(
            *([lean_fcm(em, n_fcm)] if n_fcm else []),
            *([lean_apns(em, n_apns)] if n_apns else []),
        )
        seconds = time.perf_counter() - t0
        client = (time.process_time() - cpu0) / seconds
        emulator = (cpu_ticks(em.proc.pid) - em0) / hz / seconds
    finally:
        os.sched_setaffinity(0, everywhere)
    ok = sum(delivered_ok for _, delivered_ok in results)
    logged = (await delivered(em, em.fcm_port), await delivered(em, em.apns_port))
    exact = ok == sum(d.total for d in logged) == sum(d.unique for d in logged) == n_fcm + n_apns
    return Rate(n_fcm + n_apns, seconds, client, emulator, exact)


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
