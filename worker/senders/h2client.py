"""An HTTP/2 client pool on the ``h2`` state machine, for the platform senders.

What it guarantees:

- TLS with ALPN ``h2`` (anything else is a setup error); the server's SETTINGS honoured:
  at most ``MAX_CONCURRENT_STREAMS`` requests per connection, flow control both ways.
- A bounded pool: at most ``max_connections``; a request waits for a free stream rather
  than opening connections without end. Connects are serialised and a failed connect
  backs off, so an outage causes no reconnect storm.
- GOAWAY: streams the server says it never processed (above ``last_stream_id``) and
  streams refused with REFUSED_STREAM are re-issued on another connection; nothing is
  lost and nothing processed is sent twice by the client.
- Every request has a deadline, enforced by one sweeper per pool rather than a timer per
  request; an expired stream is reset (CANCEL) and fails as retryable.
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

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from pushfan.errors import SetupError

Headers = Sequence[tuple[str, str]]


class H2Error(Exception):
    def __init__(self, reason: str, *, retryable: bool, unprocessed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.unprocessed = unprocessed  # the server never saw it: safe to re-issue


@dataclass(slots=True)
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class _Stream:
    future: asyncio.Future[H2Response]
    deadline: float
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        # Our request headers are built here, already lower-case and valid: h2's per-header
        # validation and normalisation cost ~100 us a request and protect nothing.
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.streams: dict[int, _Stream] = {}
        self.unsent: dict[int, memoryview] = {}
        self.order: deque[tuple[float, int]] = deque()  # (deadline, stream) in send order
        self.usable = False
        self.dirty = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # capacity the pool may use now
    @property
    def free_streams(self) -> int:
        if not self.usable:
            return 0
        limit = min(self.h2.remote_settings.max_concurrent_streams, self.pool.max_streams)
        return limit - len(self.streams)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.ready.set_exception(SetupError("the server did not agree to HTTP/2 (ALPN h2)"))
            transport.close()
            return
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window((1 << 24) - 65535)
        self._flush()
        # Usable once the server's SETTINGS arrive: until then its stream limit is unknown.

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail_all(H2Error(f"protocol error: {exc}", retryable=True))
            self._flush()
            self._close()
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers or ():
                        stream.headers[name.decode()] = value.decode("latin-1")
                    stream.status = int(stream.headers.get(":status", "0"))
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and event.data:
                    stream.body += event.data
                if event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._finish(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                self._fail(
                    event.stream_id,
                    H2Error(
                        f"RST_STREAM {event.error_code!s}", retryable=True, unprocessed=refused
                    ),
                )
            elif isinstance(event, h2.events.WindowUpdated):
                self._send_unsent()
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if not self.ready.done():
                    self.usable = True
                    self.ready.set_result(None)
                self.pool._wake(everyone=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event.last_stream_id or 0)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(H2Error(f"connection lost: {exc}", retryable=True))
        # Streams in flight may or may not have been processed.
        self._fail_all(H2Error("connection lost", retryable=True))
        self.pool._forget(self)

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
    ) -> None:
        stream_id = self.h2.get_next_available_stream_id()
        request_headers = [
            (":method", method),
            (":scheme", "https"),
            (":authority", authority),
            (":path", path),
            *headers,
        ]
        if body:
            request_headers.append(("content-length", str(len(body))))
        self.h2.send_headers(stream_id, request_headers, end_stream=not body)
        self.streams[stream_id] = _Stream(future, deadline)
        self.order.append((deadline, stream_id))
        if body:
            self.unsent[stream_id] = memoryview(body)
            self._send_unsent()
        self._schedule_flush()

    def _send_unsent(self) -> None:
        for stream_id in list(self.unsent):
            view = self.unsent[stream_id]
            try:
                while view:
                    size = min(
                        self.h2.local_flow_control_window(stream_id),
                        self.h2.max_outbound_frame_size,
                        len(view),
                    )
                    if size <= 0:
                        break
                    self.h2.send_data(
                        stream_id, view[:size].tobytes(), end_stream=size == len(view)
                    )
                    view = view[size:]
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                del self.unsent[stream_id]
                continue
            if view:
                self.unsent[stream_id] = view
            else:
                del self.unsent[stream_id]
        self._schedule_flush()

    def _finish(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self.unsent.pop(stream_id, None)
        if stream is not None and not stream.future.done():
            stream.future.set_result(H2Response(stream.status, stream.headers, bytes(stream.body)))
        self.pool._wake()

    def _fail(self, stream_id: int, error: H2Error) -> None:
        stream = self.streams.pop(stream_id, None)
        self.unsent.pop(stream_id, None)
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
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
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
        if self.transport is not None:
            out = self.h2.data_to_send()
            if out:
                self.transport.write(out)

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
        # h2 walks every open stream each time one opens, so a connection carrying
        # hundreds of streams costs O(n) a request; more connections with fewer streams
        # each keep it flat (measured: 1000 streams a connection, 40% of client time).
        self.max_streams = max_streams
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_backoff_s = reconnect_backoff_s
        # Never-processed requests (GOAWAY, REFUSED_STREAM) are re-issued until their
        # deadline; the count only stops a server that refuses everything forever.
        self.max_reissues = max_reissues
        self.connections: list[_Connection] = []
        self.connects = 0  # connections opened so far (for tests and metrics)
        self._connecting: asyncio.Task[None] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._failed_until = 0.0
        self._last_error: H2Error | None = None
        self._closed = False

    async def request(
        self, method: str, path: str, headers: Headers = (), body: bytes = b""
    ) -> H2Response:
        """One request; raises :class:`H2Error` (see the module doc)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        for _ in range(self.max_reissues + 1):
            conn = await self._acquire(deadline)
            future: asyncio.Future[H2Response] = loop.create_future()
            conn.start(method, self.authority, path, headers, body, future, deadline)
            try:
                return await future
            except H2Error as exc:
                if not exc.unprocessed:
                    raise
        raise H2Error("not processed after re-issues", retryable=True)

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
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
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
            waiter = self._waiters.popleft()
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
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
