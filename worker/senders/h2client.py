"""An HTTP/2 client pool for the platform senders, written on frames (``pushfan.http2``).

It speaks HTTP/2 directly rather than through ``h2``'s state machine, whose ~150 us a
request capped a core at a few thousand messages a second. A batch of requests
(:meth:`H2Pool.send_many`) is one future: requests waiting for a stream wait in the
pool's queue as ``(batch, index)``, and the connections (:mod:`worker.senders.h2conn`)
start them from their callbacks as streams free up, with no task or future per request.
Responses are decoded with ``hpack`` (servers index and Huffman-code).

What it guarantees:

- TLS with ALPN ``h2`` (anything else is a setup error); the server's SETTINGS honoured:
  at most ``MAX_CONCURRENT_STREAMS`` requests per connection, its frame size, flow
  control both ways (request bodies wait for window; response data is acknowledged).
- A bounded pool: at most ``max_connections`` and ``max_in_flight`` requests in flight;
  a request waits for a free stream rather than opening connections without end.
  Connects are serialised and a failed connect backs off, so an outage causes no
  reconnect storm.
- GOAWAY: streams the server says it never processed (above ``last_stream_id``) and
  streams refused with REFUSED_STREAM are re-issued on another connection; nothing is
  lost and nothing processed is sent twice by the client.
- Every request has a deadline, enforced by one sweeper per pool rather than a timer per
  request; an expired stream is reset (CANCEL) and fails as retryable.
- A peer that breaks the protocol gets GOAWAY with the error code and the connection
  closes; its streams fail as retryable.
- Frames produced during one loop turn go out in one ``transport.write``.

A request that gets no answer has an :class:`H2Error` whose ``retryable`` says whether
it may be sent again (it may have been processed when the connection dropped mid-flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Sequence

from pushfan import http2
from pushfan.errors import SetupError
from pushfan.metrics import Traffic
from worker.senders.exchange import H2Error, H2Response, Headers, Replies, batch_size
from worker.senders.h2conn import Batch, Connection

__all__ = ["H2Error", "H2Pool", "H2Response", "Replies"]


class H2Pool:
    """Up to ``max_connections`` HTTP/2 connections to one origin."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        max_connections: int = 4,
        max_streams: int = 100,
        max_in_flight: int | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        reconnect_backoff_s: float = 1.0,
        max_reissues: int = 1000,
    ) -> None:
        ssl_context.set_alpn_protocols(["h2"])
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.authority = f"{self.server_hostname}:{port}" if port != 443 else self.server_hostname
        self.max_connections = max_connections
        # Our own cap below the server's: FCM allows 100 streams a connection, and a
        # connection lost mid-flight puts fewer requests in doubt.
        self.max_streams = max_streams
        self.max_in_flight = max_in_flight or max_connections * max_streams
        self.encoder = http2.HeaderEncoder()  # shared: its blocks depend on no connection
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_backoff_s = reconnect_backoff_s
        # Never-processed requests (GOAWAY, REFUSED_STREAM) are re-issued until their
        # deadline; the count (per batch) only stops a server that refuses everything.
        self.max_reissues = max_reissues
        self.connections: list[Connection] = []
        self.connects = 0  # connections opened so far (for tests and metrics)
        self.traffic = Traffic()  # latency, status classes, in flight: read by /metrics
        self._queue: deque[Batch] = deque()  # batches with requests not started yet
        self._connecting: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._failed_until = 0.0
        self._last_error: H2Error | SetupError | None = None
        self._closed = False

    async def send_many(
        self,
        method: str,
        paths: str | Sequence[str],
        headers: Headers,
        bodies: bytes | Sequence[bytes],
        *,
        keep_bodies: bool = False,
    ) -> Replies:
        """See :meth:`worker.senders.exchange.Exchange.send_many`; ``keep_bodies`` keeps
        2xx answers' headers and bodies in :attr:`Replies.answers` too."""
        count = batch_size(paths, bodies)
        loop = asyncio.get_running_loop()
        now = loop.time()
        batch = Batch(
            method,
            self.authority,
            paths,
            headers,
            bodies,
            count,
            started=now,
            deadline=now + self.timeout_s,
            future=loop.create_future(),
            traffic=self.traffic,
            keep_bodies=keep_bodies,
        )
        if count == 0:
            return batch.replies
        if self._closed:
            batch.fail_unstarted(H2Error("pool closed", retryable=True))
        else:
            self._enqueue(batch)
            self._ensure_sweeper()
            self.pump()
        try:
            return await batch.future
        except asyncio.CancelledError:
            # Requests in flight are answered into a batch nobody reads; the rest never go.
            batch.next, batch.redo = batch.count, []
            raise

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers = (),
        body: bytes = b"",
        *,
        index_path: bool = False,
    ) -> H2Response:
        """One request; raises :class:`H2Error`, or :class:`~pushfan.errors.SetupError`
        when the server will not speak HTTP/2. The path is indexed in the server's table
        only with ``index_path`` (a constant path)."""
        paths: str | list[str] = path if index_path else [path]
        replies = await self.send_many(method, paths, headers, [body], keep_bodies=True)
        if replies.status[0]:
            return replies.answers[0]
        raise replies.errors[0]

    # -- the queue ------------------------------------------------------------------------

    def _enqueue(self, batch: Batch) -> None:
        if not batch.queued:
            batch.queued = True
            self._queue.append(batch)

    def pump(self) -> None:
        """Start waiting requests on free streams (connections call this as streams end);
        open a connection when every open one is full."""
        queue = self._queue
        traffic = self.traffic
        # Counted here rather than per request: a pump runs once per batch of answers.
        traffic.in_flight = in_flight = sum(len(c.streams) for c in self.connections)
        while queue:
            room = self.max_in_flight - in_flight
            if room <= 0:
                return
            conn = max(self.connections, key=_free, default=None)
            free = conn.free_streams if conn is not None else 0
            if conn is None or free <= 0:
                self._connect_or_fail()
                return
            wanted = min(free, room)
            while wanted and queue:
                batch = queue[0]
                started = conn.start(batch, wanted)
                in_flight += started
                wanted -= started
                if batch.waiting:
                    break  # the connection took what it could
                queue.popleft().queued = False
            traffic.in_flight = in_flight

    def failed(self, batch: Batch, i: int, error: H2Error) -> None:
        """Request ``i`` of ``batch`` got no answer: issued again if the server never
        processed it, while the batch has time and re-issues left; else its error."""
        if error.unprocessed and batch.reissues < self.max_reissues and not self._closed:
            batch.reissues += 1
            batch.redo.append(i)
            self._enqueue(batch)
        else:
            batch.failed(i, error)

    def _fail_queue(self, error: H2Error | SetupError) -> None:
        while self._queue:
            batch = self._queue.popleft()
            batch.queued = False
            batch.fail_unstarted(error)

    def _connect_or_fail(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            return
        usable = sum(1 for c in self.connections if c.usable)
        if usable >= self.max_connections:
            return  # all full: requests wait for streams
        if time.monotonic() < self._failed_until and self._last_error is not None:
            if not usable:
                self._fail_queue(self._last_error)  # nothing to wait for: no storm
            return
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        """Open one connection; only one runs at a time. Then starts waiting requests."""
        loop = asyncio.get_running_loop()
        conn: Connection | None = None
        kept = False
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
                await conn.ready
        except SetupError as exc:
            # Not the network: every connect would fail the same way. Callers get it.
            self._failed_until = time.monotonic() + self.reconnect_backoff_s
            self._last_error = exc
        except (OSError, TimeoutError, H2Error) as exc:
            self._failed_until = time.monotonic() + self.reconnect_backoff_s
            self._last_error = H2Error(f"connect failed: {exc!r}", retryable=True)
        else:
            if not self._closed:
                kept = True
                self.connects += 1
                self.connections.append(conn)
        finally:
            if conn is not None and not kept:
                conn.close()  # its SETTINGS never came, or the pool closed meanwhile
            self._connecting = None
        if self._closed:
            self._fail_queue(H2Error("pool closed", retryable=True))
        else:
            self.pump()
            for c in self.connections:
                c.flush()

    def forget(self, conn: Connection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
        self.pump()

    # -- deadlines ------------------------------------------------------------------------

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """One timer for the pool: every period, fail what passed its deadline."""
        period = max(0.01, min(0.5, self.timeout_s / 20))
        loop = asyncio.get_running_loop()
        while not self._closed or self._queue or any(c.streams for c in self.connections):
            await asyncio.sleep(period)
            self.expire(loop.time())

    def expire(self, now: float) -> None:
        for conn in list(self.connections):
            conn.expire(now)
        late = [b for b in self._queue if b.deadline <= now]
        if late:
            self._queue = deque(b for b in self._queue if b.deadline > now)
            for batch in late:
                batch.queued = False
                batch.fail_unstarted(H2Error("TIMEOUT waiting for a stream", retryable=True))
        self.pump()

    async def close(self) -> None:
        """Let requests in flight finish (within their deadlines), fail the ones not
        started, then close."""
        self._closed = True
        self._fail_queue(H2Error("pool closed", retryable=True))
        loop = asyncio.get_running_loop()
        for conn in list(self.connections):
            while conn.streams:
                await asyncio.sleep(0.01)
                conn.expire(loop.time())
            conn.close()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper


def _free(conn: Connection) -> int:
    return conn.free_streams
