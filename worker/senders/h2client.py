"""An HTTP/2 client pool for the platform senders, written on frames (``pushfan.http2``).

It speaks HTTP/2 directly rather than through ``h2``'s state machine, whose ~150 us a
request capped a core at a few thousand messages a second; this costs a few us a frame.
Request header blocks never touch the server's dynamic table, so they are cached and
concatenated; responses are decoded with ``hpack`` (servers index and Huffman-code).

What it guarantees:

- TLS with ALPN ``h2`` (anything else is a setup error); the server's SETTINGS honoured:
  at most ``MAX_CONCURRENT_STREAMS`` requests per connection, its frame size, flow
  control both ways (request bodies wait for window; response data is acknowledged).
- A bounded pool: at most ``max_connections``; a request waits for a free stream rather
  than opening connections without end. Connects are serialised and a failed connect
  backs off, so an outage causes no reconnect storm.
- GOAWAY: streams the server says it never processed (above ``last_stream_id``) and
  streams refused with REFUSED_STREAM are re-issued on another connection; nothing is
  lost and nothing processed is sent twice by the client.
- Every request has a deadline, enforced by one sweeper per pool rather than a timer per
  request; an expired stream is reset (CANCEL) and fails as retryable.
- A peer that breaks the protocol gets GOAWAY with the error code and the connection
  closes; its streams fail as retryable.
- Frames produced during one loop turn go out in one ``transport.write``.

Failures raise :class:`H2Error` whose ``retryable`` says whether the request may be
sent again (it may have been processed when the connection dropped mid-flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import hpack.exceptions

from pushfan import http2
from pushfan.errors import SetupError
from pushfan.metrics import Traffic
from worker.senders.exchange import H2Error, H2Response, Headers, Replies, batch_size

_UNIQUE_PATH = frozenset({":path"})

#: What we advertise: stream windows of 1 MiB and a 16 MiB connection window, so
#: responses never wait on us; acknowledged once half is consumed.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 1 << 24


@dataclass(slots=True)
class _Stream:
    future: asyncio.Future[H2Response]
    deadline: float
    window: int  # what we may still send on this stream
    unsent: memoryview | None = None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    unacked: int = 0  # response bytes received and not yet given back as window


class _Connection(asyncio.Protocol):
    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.reader = http2.FrameReader()
        self.decoder = http2.HeaderDecoder()
        self.encoder = http2.IndexingEncoder(pool.encoder)
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, None] = {}  # streams with body bytes waiting for window
        self.order: deque[tuple[float, int]] = deque()  # (deadline, stream) in send order
        self.out: list[bytes] = []
        self.next_stream_id = 1
        self.continuation: tuple[int, int, list[bytes]] | None = None
        # the server's settings (RFC 9113 defaults until its SETTINGS arrive)
        self.max_concurrent = 1 << 31
        self.initial_window = http2.DEFAULT_WINDOW
        self.max_frame_size = http2.DEFAULT_FRAME_SIZE
        self.send_window = http2.DEFAULT_WINDOW
        self.unacked = 0  # connection-level received bytes not yet acknowledged
        self.usable = False
        self.dirty = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # capacity the pool may use now
    @property
    def free_streams(self) -> int:
        if not self.usable:
            return 0
        return min(self.max_concurrent, self.pool.max_streams) - len(self.streams)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.ready.set_exception(SetupError("the server did not agree to HTTP/2 (ALPN h2)"))
            transport.close()
            return
        settings = {http2.ENABLE_PUSH: 0, http2.INITIAL_WINDOW_SIZE: STREAM_WINDOW}
        self.out.append(http2.PREFACE + http2.settings_frame(settings))
        self.out.append(http2.window_update(0, CONNECTION_WINDOW - http2.DEFAULT_WINDOW))
        self._flush()
        # Usable once the server's SETTINGS arrive: until then its stream limit is unknown.

    def data_received(self, data: bytes) -> None:
        try:
            for kind, flags, stream_id, payload in self.reader.feed(data):
                self._frame(kind, flags, stream_id, payload)
        except http2.ConnectionError_ as exc:
            self._protocol_error(exc.code, str(exc))
        except hpack.exceptions.HPACKError as exc:
            self._protocol_error(http2.COMPRESSION_ERROR, f"header block: {exc}")
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(H2Error(f"connection lost: {exc}", retryable=True))
        # Streams in flight may or may not have been processed.
        self._fail_all(H2Error("connection lost", retryable=True))
        self.pool._forget(self)

    # -- frames in ------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is not None and kind != http2.CONTINUATION:
            raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == http2.DATA:
            self._data(flags, stream_id, payload)
        elif kind == http2.HEADERS:
            if stream_id == 0:
                raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "HEADERS on stream 0")
            fragment = http2.strip_padding(flags, payload, priority=True)
            if flags & http2.END_HEADERS:
                self._headers(stream_id, flags, fragment)
            else:
                self.continuation = (stream_id, flags, [fragment])
        elif kind == http2.CONTINUATION:
            if self.continuation is None or self.continuation[0] != stream_id:
                raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "stray CONTINUATION")
            self.continuation[2].append(payload)
            if flags & http2.END_HEADERS:
                _, first_flags, fragments = self.continuation
                self.continuation = None
                self._headers(stream_id, first_flags, b"".join(fragments))
        elif kind == http2.SETTINGS:
            if not flags & http2.ACK:
                self._settings(http2.parse_settings(payload))
        elif kind == http2.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == http2.RST_STREAM:
            if len(payload) != 4:
                raise http2.ConnectionError_(http2.FRAME_SIZE_ERROR, "RST_STREAM size")
            code = http2.u32(payload)
            name = http2.ERROR_NAMES.get(code, str(code))
            refused = code == http2.REFUSED_STREAM
            self._fail(
                stream_id, H2Error(f"RST_STREAM {name}", retryable=True, unprocessed=refused)
            )
        elif kind == http2.PING:
            if len(payload) != 8:
                raise http2.ConnectionError_(http2.FRAME_SIZE_ERROR, "PING size")
            if not flags & http2.ACK:
                self.out.append(http2.frame(http2.PING, http2.ACK, 0, payload))
        elif kind == http2.GOAWAY:
            if len(payload) < 8:
                raise http2.ConnectionError_(http2.FRAME_SIZE_ERROR, "GOAWAY size")
            self._goaway(http2.u32(payload) & http2.MAX_STREAM_ID)
        elif kind == http2.PUSH_PROMISE:
            raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "PUSH_PROMISE with push off")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 requires.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # padding counts against flow control
        self.unacked += size
        if self.unacked >= CONNECTION_WINDOW // 2:
            self.out.append(http2.window_update(0, self.unacked))
            self.unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # reset or expired by us meanwhile
        stream.body += http2.strip_padding(flags, payload)
        if flags & http2.END_STREAM:
            self._finish(stream_id)
            return
        stream.unacked += size
        if stream.unacked >= STREAM_WINDOW // 2:
            self.out.append(http2.window_update(stream_id, stream.unacked))
            stream.unacked = 0

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        # Decoded even for streams we no longer track: the table must stay in step.
        fields = self.decoder.decode(block)
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        for name, value in fields:
            if name == b":status":
                stream.status = int(value)
            else:
                stream.headers[name.decode("latin-1")] = value.decode("latin-1")
        if flags & http2.END_STREAM:
            self._finish(stream_id)
        elif 100 <= stream.status < 200:
            stream.status = 0  # informational: the real answer follows

    def _settings(self, values: dict[int, int]) -> None:
        self.max_concurrent = values.get(http2.MAX_CONCURRENT_STREAMS, self.max_concurrent)
        self.max_frame_size = values.get(http2.MAX_FRAME_SIZE, self.max_frame_size)
        if http2.HEADER_TABLE_SIZE in values:
            self.encoder.set_table_size(values[http2.HEADER_TABLE_SIZE])
        window = values.get(http2.INITIAL_WINDOW_SIZE)
        if window is not None:
            delta, self.initial_window = window - self.initial_window, window
            for stream in self.streams.values():
                stream.window += delta
        self.out.append(http2.frame(http2.SETTINGS, http2.ACK, 0))
        if not self.ready.done():
            self.usable = True
            self.ready.set_result(None)
        self._send_blocked()
        self.pool._wake(everyone=True)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise http2.ConnectionError_(http2.FRAME_SIZE_ERROR, "WINDOW_UPDATE size")
        increment = http2.u32(payload) & http2.MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.send_window += increment
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.window += increment
        self._send_blocked()

    def _protocol_error(self, code: int, reason: str) -> None:
        self.out.append(http2.goaway(0, code, reason.encode()[:200]))
        self.usable = False
        self._fail_all(H2Error(f"protocol error: {reason}", retryable=True))
        self._flush()
        self._close()

    # -- requests -------------------------------------------------------------------------

    def start(
        self,
        method: str,
        authority: str,
        path: str,
        headers: Headers,
        body: bytes,
        future: asyncio.Future[H2Response],
        deadline: float,
        index_path: bool,
    ) -> None:
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        if self.next_stream_id > http2.MAX_STREAM_ID:
            self.usable = False  # ids exhausted: later requests go to a new connection
        fields = [(":method", method), (":scheme", "https"), (":authority", authority)]
        fields.append((":path", path))
        fields += headers
        if body:
            fields.append(("content-length", str(len(body))))
        block = self.encoder.block(fields, () if index_path else _UNIQUE_PATH)
        self.out += http2.header_frames(
            stream_id, block, end_stream=not body, max_frame_size=self.max_frame_size
        )
        stream = _Stream(future, deadline, self.initial_window)
        self.streams[stream_id] = stream
        self.order.append((deadline, stream_id))
        if body:
            stream.unsent = memoryview(body)
            self._send_body(stream_id, stream)
        self._schedule_flush()

    def _send_body(self, stream_id: int, stream: _Stream) -> None:
        """As much of the stream's body as the windows allow; the rest waits."""
        unsent = stream.unsent
        assert unsent is not None
        window = min(self.send_window, stream.window)
        frames, view = http2.data_frames(stream_id, unsent, window, self.max_frame_size)
        self.out += frames
        sent = len(unsent) - len(view)
        self.send_window -= sent
        stream.window -= sent
        if view:
            stream.unsent = view
            self.blocked[stream_id] = None
        else:
            stream.unsent = None
            self.blocked.pop(stream_id, None)

    def _send_blocked(self) -> None:
        for stream_id in list(self.blocked):
            if self.send_window <= 0:
                break
            stream = self.streams.get(stream_id)
            if stream is None:
                del self.blocked[stream_id]
            else:
                self._send_body(stream_id, stream)
        self._schedule_flush()

    def _finish(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self.blocked.pop(stream_id, None)
        if stream is not None and not stream.future.done():
            stream.future.set_result(H2Response(stream.status, stream.headers, bytes(stream.body)))
        self.pool._wake()

    def _fail(self, stream_id: int, error: H2Error) -> None:
        stream = self.streams.pop(stream_id, None)
        self.blocked.pop(stream_id, None)
        if stream is not None and not stream.future.done():
            stream.future.set_exception(error)
        self.pool._wake()

    def _fail_all(self, error: H2Error) -> None:
        for stream_id in list(self.streams):
            self._fail(stream_id, error)

    def _goaway(self, last_stream_id: int) -> None:
        self.usable = False
        for stream_id in [s for s in self.streams if s > last_stream_id]:
            self._fail(stream_id, H2Error("GOAWAY", retryable=True, unprocessed=True))
        if not self.streams:
            self._close()
        self.pool._wake(everyone=True)

    def expire(self, now: float) -> None:
        """Reset and fail the streams whose deadline has passed."""
        while self.order and self.order[0][0] <= now:
            _, stream_id = self.order.popleft()
            if stream_id in self.streams:
                self.out.append(http2.rst_stream(stream_id, http2.CANCEL))
                self._fail(stream_id, H2Error("TIMEOUT", retryable=True))
        self._flush()
        if not self.usable and not self.streams:
            self._close()

    # -- output ---------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self.dirty:
            self.dirty = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.dirty = False
        if self.out:
            out, self.out = self.out, []
            if self.transport is not None:
                self.transport.write(b"".join(out))

    def _close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()


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
        self._in_flight = asyncio.Semaphore(max_in_flight or max_connections * max_streams)
        self.encoder = http2.HeaderEncoder()  # shared: its blocks depend on no connection
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_backoff_s = reconnect_backoff_s
        # Never-processed requests (GOAWAY, REFUSED_STREAM) are re-issued until their
        # deadline; the count only stops a server that refuses everything forever.
        self.max_reissues = max_reissues
        self.connections: list[_Connection] = []
        self.connects = 0  # connections opened so far (for tests and metrics)
        self.traffic = Traffic()  # latency, status classes, in flight: read by /metrics
        self._connecting: asyncio.Task[None] | None = None
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._failed_until = 0.0
        self._last_error: H2Error | SetupError | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers = (),
        body: bytes = b"",
        *,
        index_path: bool = False,
    ) -> H2Response:
        """One request; raises :class:`H2Error` (see the module doc), or
        :class:`~pushfan.errors.SetupError` when the server will not speak HTTP/2.

        ``headers`` are indexed in the server's table (they should repeat across
        requests); the path only with ``index_path`` (a constant path)."""
        async with self._in_flight:
            return await self._request(method, path, headers, body, index_path)

    async def _request(
        self, method: str, path: str, headers: Headers, body: bytes, index_path: bool
    ) -> H2Response:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.timeout_s
        traffic = self.traffic
        traffic.in_flight += 1
        try:
            for _ in range(self.max_reissues + 1):
                conn = await self._acquire(deadline)
                future: asyncio.Future[H2Response] = loop.create_future()
                conn.start(
                    method, self.authority, path, headers, body, future, deadline, index_path
                )
                try:
                    response = await future
                except H2Error as exc:
                    if not exc.unprocessed:
                        raise
                else:
                    traffic.answered(loop.time() - started, response.status)
                    return response
            raise H2Error("not processed after re-issues", retryable=True)
        except H2Error:
            traffic.failed()
            raise
        finally:
            traffic.in_flight -= 1

    async def send_many(
        self,
        method: str,
        paths: str | Sequence[str],
        headers: Headers,
        bodies: bytes | Sequence[bytes],
    ) -> Replies:
        """Many requests at once, one reply each, in order; never raises :class:`H2Error`
        (a request's failure is in :attr:`Replies.errors`), only
        :class:`~pushfan.errors.SetupError`.

        ``paths`` and ``bodies`` are each one value shared by every request or one per
        request; at least one of them is a sequence, and their lengths agree. A shared
        path is indexed in the server's table, per-request paths never are. ``headers``
        are the same for every request.
        """
        count = batch_size(paths, bodies)
        replies = Replies([0] * count)

        async def one(i: int) -> None:
            path = paths if isinstance(paths, str) else paths[i]
            body = bodies if isinstance(bodies, bytes) else bodies[i]
            try:
                response = await self.request(
                    method, path, headers, body, index_path=isinstance(paths, str)
                )
            except H2Error as exc:
                replies.errors[i] = exc
                return
            replies.status[i] = response.status
            if not 200 <= response.status < 300:
                replies.answers[i] = response

        await asyncio.gather(*(one(i) for i in range(count)))
        return replies

    async def _acquire(self, deadline: float) -> _Connection:
        """A connection with a free stream: waits for one rather than queueing on a
        connect, so a slow connect never holds back requests an open connection could
        carry."""
        loop = asyncio.get_running_loop()
        self._ensure_sweeper()
        while True:
            if self._closed:
                raise H2Error("pool closed", retryable=True)
            best = max(self.connections, key=lambda c: c.free_streams, default=None)
            if best is not None and best.free_streams > 0:
                return best
            usable = sum(1 for c in self.connections if c.usable)
            connecting = self._connecting is not None and not self._connecting.done()
            if not connecting and usable < self.max_connections:
                if time.monotonic() < self._failed_until and self._last_error is not None:
                    if not usable:
                        raise self._last_error  # nothing to wait for: fail fast, no storm
                else:
                    self._connecting = loop.create_task(self._connect())
            if loop.time() >= deadline:
                raise H2Error("TIMEOUT waiting for a stream", retryable=True)
            # No timer per wait: the sweeper wakes a waiter whose deadline has passed.
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((deadline, waiter))
            await waiter

    async def _connect(self) -> None:
        """Open one connection; only one runs at a time. Wakes every waiting request."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
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
            self.connects += 1
            self.connections.append(conn)
        finally:
            self._wake(everyone=True)

    def _forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
        self._wake(everyone=True)

    def _wake(self, *, everyone: bool = False) -> None:
        """Let a request waiting for a stream look again (all of them on bigger changes)."""
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        period = max(0.01, min(0.5, self.timeout_s / 20))
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(period)
            now = loop.time()
            for conn in list(self.connections):
                conn.expire(now)
            if self._waiters and min(d for d, _ in self._waiters) <= now:
                waiting = self._waiters
                self._waiters = deque()
                for deadline, waiter in waiting:
                    if waiter.done():
                        continue
                    if deadline <= now:
                        waiter.set_result(None)  # it sees its deadline and raises
                    else:
                        self._waiters.append((deadline, waiter))

    async def close(self) -> None:
        """Let in-flight requests finish (within their deadlines), then close."""
        self._closed = True
        for conn in list(self.connections):
            while conn.streams:
                await asyncio.sleep(0.01)
                conn.expire(asyncio.get_running_loop().time())
            conn._close()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
