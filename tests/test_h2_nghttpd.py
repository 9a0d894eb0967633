"""The senders' HTTP/2 client against nghttpd (nghttp2's server): an implementation not
ours, with the knobs real servers turn.

Each test starts its own ``nghttpd`` on a free loopback port, with TLS from the test CA
and a docroot of files made here, so every body can be checked byte for byte; a server
started with ``-v`` logs each frame and header it received, which lets a test check what
reached the server (headers decoded exactly, DATA never beyond the window, never more
streams open than allowed), not only what came back.

Delays: nghttpd 1.52's ``?nghttpd_do_not_respond_to_req=yes`` still answers (it compares
the query with its leading ``?``), so the deadline test freezes the server (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pushfan.emulators.credentials import Credentials, ensure_credentials
from tests.h2peer import assert_complete, pending_streams, until
from worker.senders.exchange import H2Error
from worker.senders.h2client import H2Pool


def _find_nghttpd() -> str | None:
    found = shutil.which("nghttpd")
    if found is None and os.access("/usr/sbin/nghttpd", os.X_OK):
        found = "/usr/sbin/nghttpd"  # sbin is not on every PATH
    return found


NGHTTPD = _find_nghttpd()
pytestmark = pytest.mark.skipif(
    NGHTTPD is None, reason="nghttpd is not installed (Debian: apt-get install nghttp2-server)"
)

HELLO = b"hello from nghttpd\n"
BIG = random.Random(1).randbytes(4 << 20)
NUMBERED = [(f"file {i}\n" * (i + 1)).encode() for i in range(64)]
NOT_FOUND_PAGE = re.compile(rb"<html><head><title>404 Not Found</title>.*</html>", re.S)


@dataclass
class Log:
    """What a ``-v`` nghttpd logged, by session (connection)."""

    headers: dict[tuple[int, int], list[tuple[str, str]]] = field(default_factory=dict)
    opened: Counter[int] = field(default_factory=Counter)  # streams opened by session
    most_open: dict[int, int] = field(default_factory=dict)  # most open at once by session
    data_lengths: list[int] = field(default_factory=list)  # of the DATA frames received
    closed: int = 0
    sent_rst: int = 0
    sent_goaway: int = 0
    settings_sent: list[str] = field(default_factory=list)


_PREFIX = r"^\[id=(\d+)\] \[ *[\d.]+\] "
_HEADER = re.compile(_PREFIX + r"recv \(stream_id=(\d+)\) (:?[^:]+): (.*)$")
_CLOSED = re.compile(_PREFIX + r"stream_id=\d+ closed$")
_RECV_DATA = re.compile(_PREFIX + r"recv DATA frame <length=(\d+),")
_SESSION = re.compile(_PREFIX)


def parse_log(text: str) -> Log:
    log = Log()
    session = 0
    open_now: Counter[int] = Counter()
    headers: defaultdict[tuple[int, int], list[tuple[str, str]]] = defaultdict(list)
    for line in text.splitlines():
        if started := _SESSION.match(line):
            session = int(started[1])
        if got := _HEADER.match(line):
            headers[int(got[1]), int(got[2])].append((got[3], got[4]))
        elif line.strip() == "; Open new stream":
            log.opened[session] += 1
            open_now[session] += 1
            log.most_open[session] = max(log.most_open.get(session, 0), open_now[session])
        elif _CLOSED.match(line):
            open_now[session] -= 1
            log.closed += 1
        elif got := _RECV_DATA.match(line):
            log.data_lengths.append(int(got[2]))
        elif " send RST_STREAM frame" in line:
            log.sent_rst += 1
        elif " send GOAWAY frame" in line:
            log.sent_goaway += 1
        elif line.strip().startswith("[SETTINGS_"):
            log.settings_sent.append(line.strip())
    log.headers = dict(headers)
    return log


@dataclass
class Nghttpd:
    process: asyncio.subprocess.Process
    port: int
    log_file: Path

    def log(self) -> Log:
        return parse_log(self.log_file.read_text(errors="replace"))

    async def logged(self, closed: int) -> Log:
        """The log once it shows ``closed`` streams closed (nghttpd flushes each line)."""
        await until(lambda: self.log().closed >= closed, within=10)
        return self.log()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP): it reads, answers and accepts nothing meanwhile."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    async def stop(self) -> None:
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


StartNghttpd = Callable[..., Awaitable[Nghttpd]]


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return ensure_credentials(tmp_path_factory.mktemp("tls"), "https://127.0.0.1/token")


@pytest.fixture(scope="module")
def docroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("htdocs")
    (root / "hello.txt").write_bytes(HELLO)
    (root / "big.bin").write_bytes(BIG)
    (root / "n").mkdir()
    for i, content in enumerate(NUMBERED):
        (root / "n" / f"{i}.txt").write_bytes(content)
    return root


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def nghttpd(creds: Credentials, docroot: Path, tmp_path: Path) -> AsyncIterator[StartNghttpd]:
    """``await nghttpd(*options, verbose=False)``: a new nghttpd with those options,
    accepting connections; stopped after the test."""
    servers: list[Nghttpd] = []

    async def start(*options: str, verbose: bool = False) -> Nghttpd:
        assert NGHTTPD is not None
        for attempt in range(3):  # a port taken between probe and bind: another one
            port = _free_port()
            log_file = tmp_path / f"nghttpd-{len(servers)}-{attempt}.log"
            command = [NGHTTPD, "-a", "127.0.0.1", "-d", str(docroot), *options]
            if verbose:
                command.append("-v")
            command += [str(port), str(creds.key_file), str(creds.cert_file)]
            with log_file.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    *command, stdout=out, stderr=subprocess.STDOUT
                )
            server = Nghttpd(process, port, log_file)
            servers.append(server)
            deadline = time.monotonic() + 10
            while process.returncode is None and time.monotonic() < deadline:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                return server
            await server.stop()
        raise AssertionError(f"nghttpd did not start: {log_file.read_text(errors='replace')}")

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def pool_on(creds: Credentials) -> AsyncIterator[Callable[..., H2Pool]]:
    """``pool_on(server, **options)``: an H2Pool to that nghttpd, closed after the test."""
    pools: list[H2Pool] = []

    def make(server: Nghttpd, **options: float) -> H2Pool:
        pool = H2Pool(
            "127.0.0.1",
            server.port,
            ssl_context=creds.client_ssl_context(),
            **options,  # type: ignore[arg-type]
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


PoolOn = Callable[..., H2Pool]


async def test_get_returns_each_file_byte_for_byte(nghttpd: StartNghttpd, pool_on: PoolOn) -> None:
    pool = pool_on(await nghttpd())

    hello, numbered, big, missing = await asyncio.gather(
        pool.request("GET", "/hello.txt"),
        pool.request("GET", "/n/17.txt"),
        pool.request("GET", "/big.bin"),
        pool.request("GET", "/no/such/file"),
    )

    assert (hello.status, hello.body) == (200, HELLO)
    assert hello.headers["content-length"] == str(len(HELLO))
    assert hello.headers["content-type"] == "text/plain"
    assert (numbered.status, numbered.body) == (200, NUMBERED[17])
    assert (big.status, len(big.body)) == (200, len(BIG))
    assert big.body == BIG
    assert missing.status == 404
    assert NOT_FOUND_PAGE.fullmatch(missing.body)


async def test_post_bodies_are_echoed_byte_for_byte(nghttpd: StartNghttpd, pool_on: PoolOn) -> None:
    """Bodies around every boundary: none, one byte, the frame size (16384) and either
    side of it, nghttpd's default window (65535) and either side, and 1 MiB."""
    pool = pool_on(await nghttpd("--echo-upload"))
    sizes = [0, 1, 16383, 16384, 16385, 65535, 65536, 100_000, 1 << 20]
    bodies = [random.Random(size).randbytes(size) for size in sizes]

    responses = await asyncio.gather(
        *(pool.request("POST", "/echo", [("content-type", "x/y")], body) for body in bodies)
    )

    for body, response in zip(bodies, responses, strict=True):
        assert response.status == 200
        assert response.headers["nghttpd-response"] == "echo"
        assert response.headers["content-length"] == str(len(body))
        assert response.body == body


async def test_send_many_answers_every_index_with_its_own_status(
    nghttpd: StartNghttpd, pool_on: PoolOn
) -> None:
    """300 GETs, every fifth to a missing file: the 404s are answers at exactly those
    indices (with nghttpd's page), the rest 200; then 200 POSTs of distinct bodies."""
    pool = pool_on(await nghttpd("--echo-upload"))
    paths = [f"/missing/{i}" if i % 5 == 0 else f"/n/{i % 64}.txt" for i in range(300)]

    replies = await pool.send_many("GET", paths, [], b"")

    assert_complete(replies, 300)
    assert replies.errors == {}
    assert replies.status == [404 if i % 5 == 0 else 200 for i in range(300)]
    assert set(replies.answers) == set(range(0, 300, 5))
    for answer in replies.answers.values():
        assert NOT_FOUND_PAGE.fullmatch(answer.body)

    bodies = [b"%d" % i * (i + 1) for i in range(200)]
    replies = await pool.send_many("POST", "/echo", [("content-type", "x/y")], bodies)

    assert_complete(replies, 200)
    assert replies.status == [200] * 200
    assert pool.traffic.classes["2xx"] == 240 + 200
    assert pool.traffic.classes["4xx"] == 60
    assert pool.traffic.in_flight == 0
    assert pending_streams(pool) == 0


async def test_a_15_byte_window_carries_a_100_kb_body(
    nghttpd: StartNghttpd, pool_on: PoolOn
) -> None:
    """nghttpd's windows at 2^4-1 bytes (stream and connection): the client sends 100 KB
    in DATA frames of at most 15 bytes, waiting for each WINDOW_UPDATE, and the echo
    comes back whole."""
    server = await nghttpd("--echo-upload", "-w", "4", "-W", "4", verbose=True)
    pool = pool_on(server, timeout_s=30)
    body = random.Random(4).randbytes(100_000)

    response = await pool.request("POST", "/echo", [], body)

    assert response.status == 200
    assert response.body == body
    log = await server.logged(closed=1)
    assert "[SETTINGS_INITIAL_WINDOW_SIZE(0x04):15]" in log.settings_sent
    assert max(log.data_lengths) <= 15
    assert sum(log.data_lengths) == len(body)
    assert len(log.data_lengths) >= len(body) // 15


async def test_small_windows_with_concurrent_uploads_and_multi_megabyte_downloads(
    nghttpd: StartNghttpd, pool_on: PoolOn
) -> None:
    """nghttpd's stream windows at 255 bytes and its connection window at 1023: eight
    100 KB uploads share them, never beyond; meanwhile six 4 MiB downloads (24 MiB, past
    the client's own 16 MiB connection window) need the client's WINDOW_UPDATEs. Every
    byte of every body is checked."""
    server = await nghttpd("--echo-upload", "-w", "8", "-W", "10", verbose=True)
    pool = pool_on(server, timeout_s=30)
    uploads = [random.Random(100 + i).randbytes(100_000) for i in range(8)]

    responses = await asyncio.gather(
        *(pool.request("POST", f"/echo/{i}", [], body) for i, body in enumerate(uploads)),
        *(pool.request("GET", "/big.bin") for _ in range(6)),
    )

    for body, response in zip(uploads, responses[:8], strict=True):
        assert response.status == 200
        assert response.body == body
    for response in responses[8:]:
        assert response.status == 200
        assert response.body == BIG
    log = await server.logged(closed=14)
    assert max(log.data_lengths) <= 255
    assert sum(log.data_lengths) == 8 * 100_000
    assert log.sent_rst == log.sent_goaway == 0


async def test_one_stream_at_a_time_is_never_exceeded(
    nghttpd: StartNghttpd, pool_on: PoolOn
) -> None:
    """``--max-concurrent-streams 1``: a send_many of 300 is answered in full over two
    connections, nghttpd never sees a second stream open on a connection, and it never
    had to refuse one (each request opened exactly one stream)."""
    server = await nghttpd("-m", "1", verbose=True)
    pool = pool_on(server, max_connections=2)
    paths = [f"/n/{i % 64}.txt" for i in range(300)]

    replies = await pool.send_many("GET", paths, [], b"")

    assert_complete(replies, 300)
    assert replies.status == [200] * 300
    log = await server.logged(closed=300)
    assert set(log.most_open.values()) == {1}
    assert sum(log.opened.values()) == 300
    assert len(log.opened) == pool.connects == 2
    assert log.sent_rst == log.sent_goaway == 0


@pytest.mark.parametrize(
    "options",
    [["-c", "0"], ["-c", "64"], ["-c", "256", "--encoder-header-table-size", "0"], []],
    ids=["table-0", "table-64", "table-256-encoder-0", "table-4096"],
)
async def test_header_table_sizes_every_header_arrives_exactly(
    nghttpd: StartNghttpd, pool_on: PoolOn, options: list[str]
) -> None:
    """nghttpd's decoder table at 0, 64, 256 bytes (and its own encoder's at 0): three
    batches of 100 with repeated headers (a 207-byte authorization, larger than the
    small tables) and a shared path; nghttpd decodes exactly the fields sent on every
    stream, and answers every one."""
    server = await nghttpd("--echo-upload", *options, verbose=True)
    pool = pool_on(server, max_connections=1)
    headers = [
        ("authorization", "bearer " + "j" * 200),
        ("apns-topic", "com.example.app"),
        ("apns-push-type", "alert"),
    ]
    for batch in range(3):
        replies = await pool.send_many("POST", f"/3/device/{batch}", headers, [b"{}"] * 100)
        assert_complete(replies, 100)
        assert replies.status == [200] * 100

    log = await server.logged(closed=300)
    assert len(log.headers) == 300
    for (_, stream_id), fields in log.headers.items():
        batch = (stream_id - 1) // 200  # stream ids 1, 3, 5...: 100 a batch
        assert fields == [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", f"127.0.0.1:{server.port}"),
            (":path", f"/3/device/{batch}"),
            *headers,
            ("content-length", "2"),
        ]
    assert log.sent_goaway == 0


async def test_a_request_header_block_larger_than_a_frame(
    nghttpd: StartNghttpd, pool_on: PoolOn
) -> None:
    """A 40 000-byte header value: a block past the 16 384-byte frame size, which the
    client must split over CONTINUATION; nghttpd decodes it exactly."""
    server = await nghttpd(verbose=True)
    pool = pool_on(server)
    value = "".join(random.Random(5).choices("abcdefghij", k=40_000))

    response = await pool.request("GET", "/hello.txt", [("x-long", value)])

    assert (response.status, response.body) == (200, HELLO)
    log = await server.logged(closed=1)
    (fields,) = log.headers.values()
    assert ("x-long", value) in fields


async def test_padded_frames_and_trailers(nghttpd: StartNghttpd, pool_on: PoolOn) -> None:
    """``--padding 255`` (every HEADERS and DATA frame padded) and a trailer after each
    body: bodies exact, the trailer kept among the headers, batches complete."""
    pool = pool_on(await nghttpd("--echo-upload", "-b", "255", "--trailer", "x-trailer: t1"))
    upload = random.Random(6).randbytes(70_000)

    small, big, echo = await asyncio.gather(
        pool.request("GET", "/n/3.txt"),
        pool.request("GET", "/big.bin"),
        pool.request("POST", "/echo", [], upload),
    )

    assert (small.status, small.body) == (200, NUMBERED[3])
    assert (big.status, big.body == BIG) == (200, True)
    assert (echo.status, echo.body == upload) == (200, True)
    for response in (small, big, echo):
        assert response.headers["x-trailer"] == "t1"
    paths = [f"/missing/{i}" if i % 3 == 0 else f"/n/{i % 64}.txt" for i in range(300)]
    replies = await pool.send_many("GET", paths, [], b"")
    assert_complete(replies, 300)
    assert replies.status == [404 if i % 3 == 0 else 200 for i in range(300)]
    for answer in replies.answers.values():
        assert NOT_FOUND_PAGE.fullmatch(answer.body)


async def test_many_requests_over_several_connections(
    nghttpd: StartNghttpd, pool_on: PoolOn
) -> None:
    """nghttpd allows 10 streams a connection: 400 requests open all four of the pool's
    connections, every index is answered, and 200 concurrent echoes each get back their
    own body (no answer crosses to another stream or connection)."""
    pool = pool_on(await nghttpd("--echo-upload", "-m", "10"), max_connections=4)

    replies = await pool.send_many("GET", [f"/n/{i % 64}.txt" for i in range(400)], [], b"")

    assert_complete(replies, 400)
    assert replies.status == [200] * 400
    assert pool.connects == len(pool.connections) == 4
    bodies = [random.Random(1000 + i).randbytes(i * 37) for i in range(200)]
    responses = await asyncio.gather(
        *(pool.request("POST", f"/echo/{i}", [], body) for i, body in enumerate(bodies))
    )
    assert [r.body == body for r, body in zip(responses, bodies, strict=True)] == [True] * 200
    assert pool.connects == 4
    assert pending_streams(pool) == 0


async def test_deadline_passes_while_nghttpd_is_frozen(
    nghttpd: StartNghttpd, pool_on: PoolOn
) -> None:
    """nghttpd stopped (SIGSTOP): a batch on the open connection fails at its deadline
    (TIMEOUT, retryable), and so does a batch on a new pool whose TLS handshake cannot
    finish (waiting for a stream); send_many returns by then, nothing stays pending.
    Once nghttpd runs again, the same pool's next batch is answered in full."""
    server = await nghttpd("--echo-upload")
    timeout = 0.5
    pool = pool_on(server, timeout_s=timeout)
    fresh = pool_on(server, timeout_s=timeout)
    assert (await pool.request("GET", "/hello.txt")).body == HELLO  # connected

    with server.frozen():
        started = time.monotonic()
        replies, fresh_replies = await asyncio.gather(
            pool.send_many("POST", "/echo", [], [b"%d" % i for i in range(50)]),
            fresh.send_many("POST", "/echo", [], [b"%d" % i for i in range(50)]),
        )
        elapsed = time.monotonic() - started

    assert timeout <= elapsed < timeout + 1.0
    for batch, reason in ((replies, "TIMEOUT"), (fresh_replies, "TIMEOUT waiting for a stream")):
        assert_complete(batch, 50)
        assert set(batch.errors) == set(range(50))
        for error in batch.errors.values():
            assert isinstance(error, H2Error)
            assert error.retryable
            assert str(error) == reason
    assert pending_streams(pool) == pending_streams(fresh) == 0
    assert pool.traffic.in_flight == fresh.traffic.in_flight == 0

    replies = await pool.send_many("POST", "/echo", [], [b"%d" % i for i in range(50)])
    assert_complete(replies, 50)
    assert replies.status == [200] * 50
    assert pool.connects == 1
