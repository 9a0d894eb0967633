"""The registry benchmark's load generator: a minimal HTTP/1.1 keep-alive client.

Python HTTP clients spend about a millisecond per request, more than the API does, so the
load comes from pre-built requests on persistent connections, one request in flight per
connection, responses parsed only as far as status and length.

:func:`drive` sends them as fast as they are answered, or on an open-loop schedule: each
request falls due at ``start + i / rate`` whether or not the earlier ones were answered,
and its latency counts from then, so time spent waiting for a free connection, or for
this process to get round to sending it, counts too (no coordinated omission). How late
this process let requests go (:meth:`Result.lag`) tells whether it, rather than the
server, set the pace.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

CONNECTIONS = 50
TICK = 0.001  # paced requests are released in batches this far apart (latency counts from due)


def parse_response(buf: bytes | bytearray) -> tuple[int, int] | None:
    """``(status, length)`` of the HTTP/1.1 response at the start of ``buf``, or None
    while it is incomplete. Only ``Content-Length`` framing is understood (uvicorn sends
    it with every response of the registry); raises ValueError on anything else."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line, *headers = bytes(buf[:end]).split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    status = int(code)
    length = None
    for line in headers:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError(f"malformed header line: {line[:80]!r}")
        name = name.strip().lower()
        if name == b"content-length":
            if not value.strip().isdigit():
                raise ValueError(f"bad content-length: {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not supported")
    if length is None:
        if not (100 <= status < 200 or status in (204, 304)):
            raise ValueError(f"response {status} without content-length")
        length = 0
    total = end + 4 + length
    return (status, total) if len(buf) >= total else None


def http_request(method: str, path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Result:
    seconds: float  # first request due to last response
    latencies: list[float]  # seconds, one per request
    statuses: Counter[int]
    cpu: dict[str, float] = field(default_factory=dict)  # cores used, by process
    lags: list[float] = field(default_factory=list)  # open loop: released minus due, seconds

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def backlog(self, rate: float) -> int:
        """Of an open-loop run at ``rate``: the requests not yet answered when the last
        one fell due (about ``rate`` times the latency while the server keeps up; a
        backlog that grew through the run when it does not)."""
        last_due = (len(self.latencies) - 1) / rate
        return sum(i / rate + lat > last_due for i, lat in enumerate(self.latencies))

    def percentile(self, q: float) -> float:
        return _percentile(self.latencies, q)

    def lag(self, q: float) -> float:
        """How late this process let the requests of an open-loop run go (quantile
        ``q``; waiting for a free connection is not lag, that is the server's). Latency
        counts from when a request was due, so a lag near the latency means the load
        generator set the pace, not the server."""
        return _percentile(self.lags, q) if self.lags else 0.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Run:
    """The requests of one phase and the connections working through them."""

    def __init__(self, requests: Sequence[bytes], paced: bool) -> None:
        n = len(requests)
        self.requests, self.paced = requests, paced
        self.due = [0.0] * n  # when each request's latency starts counting
        self.released = [0.0] * n  # open loop: when the schedule let it go
        self.latencies = [0.0] * n
        self.statuses: Counter[int] = Counter()
        self.waiting: deque[int] = deque()
        # First in, first out: every connection takes its turn, so none sits idle long
        # enough for the server to close it (uvicorn does after 5 s) in a slow run.
        self.idle: deque[_Connection] = deque()
        self.completed = 0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def release(self, i: int, due: float) -> None:
        self.due[i] = due
        self.released[i] = time.perf_counter()
        if self.idle:
            self.idle.popleft().send(i)
        else:
            self.waiting.append(i)

    def finished(self, conn: _Connection, i: int, status: int) -> None:
        now = time.perf_counter()
        self.latencies[i] = now - self.due[i]
        self.statuses[status] += 1
        self.completed += 1
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)
        if self.completed == len(self.requests) and not self.done.done():
            self.done.set_result(now)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.buf = bytearray()
        self.current = -1
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, i: int) -> None:
        assert self.transport is not None
        self.current = i
        if not self.run.paced:
            self.run.due[i] = time.perf_counter()
        self.transport.write(self.run.requests[i])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            parsed = parse_response(self.buf)
        except ValueError as exc:
            self.run.fail(exc)
            return
        if parsed is None:
            return
        status, used = parsed
        if used != len(self.buf):
            self.run.fail(ValueError("bytes after the response to the only request in flight"))
            return
        self.buf.clear()
        self.run.finished(self, self.current, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.fail(ConnectionError(f"the server closed a connection: {exc}"))


async def drive(
    url: str, requests: Sequence[bytes], *, connections: int = CONNECTIONS, rate: float = 0
) -> Result:
    """Send ``requests`` over ``connections`` keep-alive connections: as fast as they
    are answered, or (``rate`` > 0) each due at ``start + i / rate`` whether or not the
    earlier ones were answered."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    run = _Run(requests, paced=rate > 0)
    conns = []
    try:
        for _ in range(min(connections, len(requests))):
            _, conn = await loop.create_connection(lambda: _Connection(run), host, port)
            conns.append(conn)
        run.idle = deque(conns)
        start = time.perf_counter()
        if rate > 0:
            i, n = 0, len(requests)
            while i < n:
                now = time.perf_counter()
                while i < n and start + i / rate <= now:
                    run.release(i, start + i / rate)
                    i += 1
                if i < n:  # a tick of at least 1 ms: shorter sleeps spin this core
                    await asyncio.sleep(max(TICK, start + i / rate - time.perf_counter()))
        else:
            for i in range(len(requests)):
                run.release(i, start)
        end = await run.done
    finally:
        if not run.done.done():
            run.done.cancel()  # closing the connections below is no failure to report
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    lags = [r - d for r, d in zip(run.released, run.due, strict=True)] if rate > 0 else []
    return Result(end - start, run.latencies, run.statuses, lags=lags)
