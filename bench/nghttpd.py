"""nghttpd, nghttp2's HTTP/2 server in C, answering FCM and APNs sends with a canned 200.

A server that costs little and runs on a core of its own, so that a benchmark of the
senders measures the clients (``bench/h2.py``; the fanout bench may use it the same way).
It speaks TLS with the emulators' certificate, so clients trust it through the emulators'
CA exactly as they trust the emulators.

nghttpd serves files from a document root whatever the method, so the root holds one file
per path the senders use (:func:`canned_docroot`): FCM's answer at
``/v1/projects/<project>/messages:send`` (firebase-admin reads its ``name``), and an empty
file at ``/3/device/<token>`` for every APNs token (hard links to a few; APNs answers 200
with no body). Its ``--echo-upload`` would answer any POST, but it writes every request
body to a temporary file first and managed ~2,500 requests a second here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pushfan.emulators.credentials import Credentials

NGHTTPD = "nghttpd"  # Debian's package nghttp2-server


def binary() -> str | None:
    """nghttpd's path: on ``PATH``, or in ``/usr/sbin`` where Debian puts it (``PATH``
    often lacks it for a user other than root)."""
    return shutil.which(NGHTTPD) or shutil.which(NGHTTPD, path="/usr/sbin:/sbin")


@dataclass
class Nghttpd:
    proc: subprocess.Popen[bytes]
    port: int
    docroot: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


LINKS_PER_FILE = 50_000


def docroot_parent() -> str | None:
    """Where to make a canned docroot: a tmpfs where there is one (``/dev/shm``), else the
    default temporary directory. nghttpd looks up one file per APNs token; on tmpfs that
    cost it 4.7 us a request against 5.3-6.8 on ext4 (h2load, 100,000 tokens), CPU taken
    from the core it shares with PostgreSQL and the broker in the fanout bench."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def fcm_path(project_id: str) -> str:
    return f"/v1/projects/{project_id}/messages:send"


def canned_docroot(root: Path, *, fcm_project: str, apns_tokens: Iterable[str]) -> Path:
    """Fill ``root`` with the files behind every answer (see the module doc); returns it."""
    fcm = root / fcm_path(fcm_project).lstrip("/")
    fcm.parent.mkdir(parents=True, exist_ok=True)
    fcm.write_text(f'{{"name": "projects/{fcm_project}/messages/0:pushfan"}}')
    devices = root / "3" / "device"
    devices.mkdir(parents=True, exist_ok=True)
    empty = root / "empty"
    for i, token in enumerate(apns_tokens):
        if i % LINKS_PER_FILE == 0:  # a file takes at most 65,000 links on ext4
            empty = root / f"empty-{i // LINKS_PER_FILE}"
            empty.touch()
        with contextlib.suppress(FileExistsError):
            os.link(empty, devices / token)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def start_nghttpd(
    credentials: Credentials,
    docroot: Path,
    *,
    cpu: int | None = None,
    max_concurrent_streams: int = 100,
    startup_s: float = 10.0,
) -> Iterator[Nghttpd]:
    """Run nghttpd on 127.0.0.1 (a free port) serving ``docroot`` with the emulators' server
    certificate, pinned to ``cpu`` when given (``taskset``); stopped on exit."""
    found = binary()
    if found is None:
        raise RuntimeError("nghttpd not found: apt-get install nghttp2-server")
    port = _free_port()
    cmd = [found, "-a", "127.0.0.1", "-d", str(docroot), "-m", str(max_concurrent_streams)]
    cmd += [str(port), str(credentials.key_file), str(credentials.cert_file)]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    # stderr to a file, not a pipe: nothing could stall nghttpd
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            _wait_listening(proc, port, errors, startup_s)
            yield Nghttpd(proc, port, docroot)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_listening(
    proc: subprocess.Popen[bytes], port: int, errors: IO[bytes], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nghttpd did not listen on port {port}")
        time.sleep(0.05)
    errors.seek(0)
    raise RuntimeError(f"nghttpd exited: {errors.read().decode().strip()}")


def version() -> str:
    found = binary() or NGHTTPD
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([found, "--version"], capture_output=True, text=True).stdout.strip()
    return "nghttpd (version unknown)"
