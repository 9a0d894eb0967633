"""The reference HTTP/2 pool on the ``h2`` library's state machine, written the plain way.

Same contract as the lean pool (:mod:`worker.senders.exchange`): an asyncio Protocol per
connection feeds ``H2Connection``; a coroutine per request waits for a free stream, sends
and awaits its answer. ``PUSHFAN_*__IMPLEMENTATION=h2`` selects it; ``make bench ARGS="--only
h2"`` measures the lean pool against it. TLS with ALPN h2; at most ``max_connections``,
``max_in_flight`` and the server's MAX_CONCURRENT_STREAMS; bodies wait for h2's windows;
``timeout_s`` a request (then RST_STREAM CANCEL); GOAWAY above its last stream id and
REFUSED_STREAM are re-issued. h2 reads nothing after a GOAWAY (python-hyper/h2#1181): it
is fed whole frames up to one, and streams at or below the last id still unanswered fail
as retryable. HPACK as the lean pool: the authorization is indexed (h2's normalisation
would never index it, a defence for browsers), per-request paths never are.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from pushfan.errors import SetupError
from pushfan.metrics import Traffic
from worker.senders.exchange import H2Error, H2Response, Headers, Replies, batch_size

STREAM_WINDOW = 1 << 20  # what we advertise, as the lean pool does
CONNECTION_WINDOW = 1 << 24
RECONNECT_BACKOFF_S = 1.0  # after a failed connect, requests fail fast this long
MAX_REISSUES = 1000  # of a never-processed request, within its deadline
_GOAWAY = 0x7  # frame type


@dataclass(slots=True)
class _Stream:
    future: asyncio.Future[H2Response]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: H2RefPool) -> None:
        self.pool = pool
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, normalize_outbound_headers=False
        )
        self.h2 = h2.connection.H2Connection(config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.unread = b""  # the start of a frame not yet whole
        self.usable = self.flush_scheduled = False
        self.max_concurrent = 0  # the server's MAX_CONCURRENT_STREAMS, once it is known
        self.window_opened = asyncio.Event()  # replaced by a new one each time it is set
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def free_streams(self) -> int:
        return min(self.max_concurrent, self.pool.max_streams) - len(self.streams)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.ready.set_exception(SetupError("the server did not agree to HTTP/2 (ALPN h2)"))
            transport.close()
            return
        self.h2.initiate_connection()
        settings = {SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW}
        self.h2.update_settings(settings)  # type: ignore[arg-type]
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()  # usable once the server's SETTINGS arrive

    def data_received(self, data: bytes) -> None:
        buffer, end, goaway = self.unread + data, 0, False
        while not goaway and end + 9 <= len(buffer):  # whole frames, up to a GOAWAY
            size = int.from_bytes(buffer[end : end + 3], "big")
            if end + 9 + size > len(buffer):
                break
            goaway = buffer[end + 3] == _GOAWAY
            end += 9 + size
        self.unread = b"" if goaway else buffer[end:]
        try:
            events = self.h2.receive_data(buffer[:end]) if end else []
        except h2.exceptions.ProtocolError as exc:  # h2 has queued a GOAWAY for it
            self._fail_all(H2Error(f"protocol error: {exc}", retryable=True))
            self.flush()
            self.close()
            return
        for event in events:
            self._event(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable, self.max_concurrent, self.transport = False, 0, None
        if not self.ready.done():
            self.ready.set_exception(H2Error(f"connection lost: {exc}", retryable=True))
        self._fail_all(H2Error("connection lost", retryable=True))  # maybe processed
        with contextlib.suppress(ValueError):
            self.pool.connections.remove(self)
        self.pool._wake(everyone=True)

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            fields = {bytes(n).decode(): bytes(v).decode("latin-1") for n, v in event.headers}
            if stream is not None:
                stream.status, stream.headers = int(fields.pop(":status", 0)), fields
        elif isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.body += event.data
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None and not stream.future.done():
                stream.future.set_result(
                    H2Response(stream.status, stream.headers, bytes(stream.body))
                )
            self.pool._wake()
        elif isinstance(event, h2.events.StreamReset):
            code = event.error_code
            name = code.name if isinstance(code, ErrorCodes) else str(code)
            refused = code == ErrorCodes.REFUSED_STREAM
            error = H2Error(f"RST_STREAM {name}", retryable=True, unprocessed=refused)
            self._fail(event.stream_id, error)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.max_concurrent = self.h2.remote_settings.max_concurrent_streams
            if not self.ready.done():
                self.usable = True
                self.ready.set_result(None)
            self._open_window()
            self.pool._wake(everyone=True)
        elif isinstance(event, h2.events.WindowUpdated):
            self._open_window()
        elif isinstance(event, h2.events.ConnectionTerminated):
            for stream_id in list(self.streams):
                above = stream_id > (event.last_stream_id or 0)
                self._fail(stream_id, H2Error("GOAWAY", retryable=True, unprocessed=above))
            self.close()

    def _fail(self, stream_id: int, error: H2Error) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None and not stream.future.done():
            stream.future.set_exception(error)
        self._open_window()  # a request waiting to send its body sees its failure
        self.pool._wake()

    def _fail_all(self, error: H2Error) -> None:
        for stream_id in list(self.streams):
            self._fail(stream_id, error)

    def _open_window(self) -> None:
        self.window_opened.set()
        self.window_opened = asyncio.Event()

    async def exchange(
        self, method: str, path: str, headers: Headers, body: bytes, index_path: bool
    ) -> H2Response:
        """One request on this connection, which has a free stream."""
        fields: list[tuple[str, str] | HeaderTuple] = [(":method", method), (":scheme", "https")]
        fields.append((":authority", self.pool.authority))
        fields.append((":path", path) if index_path else NeverIndexedHeaderTuple(":path", path))
        fields += headers
        if body:
            fields.append(("content-length", str(len(body))))
        stream_id = self.h2.get_next_available_stream_id()
        future: asyncio.Future[H2Response] = asyncio.get_running_loop().create_future()
        self.streams[stream_id] = _Stream(future)
        unsent = memoryview(body)
        try:
            self.h2.send_headers(stream_id, fields, end_stream=not body)
            while unsent and not future.done():
                window = self.h2.local_flow_control_window(stream_id)
                size = min(window, self.h2.max_outbound_frame_size, len(unsent))
                if size <= 0:
                    self.schedule_flush()
                    await self.window_opened.wait()
                    continue
                chunk, unsent = unsent[:size], unsent[size:]
                self.h2.send_data(stream_id, chunk.tobytes(), end_stream=not unsent)
            self.schedule_flush()
        except h2.exceptions.H2Error as exc:  # the stream or the connection closed meanwhile
            self._fail(stream_id, H2Error(f"stream closed: {exc}", retryable=True))
        try:
            return await future
        finally:
            # Cancelled at the deadline, or answered before the whole body was sent.
            if self.streams.pop(stream_id, None) is not None or unsent:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                self.schedule_flush()
                self.pool._wake()

    def schedule_flush(self) -> None:
        """Everything h2 has to send after one loop turn goes out in one write."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        self.usable, self.max_concurrent = False, 0
        if self.transport is not None:
            self.transport.close()


class H2RefPool:
    """Up to ``max_connections`` HTTP/2 connections to one origin, on ``h2``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        max_connections: int = 4,
        max_streams: int = 100,
        max_in_flight: int | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        ssl_context.set_alpn_protocols(["h2"])
        self.host, self.port, self.ssl_context = host, port, ssl_context
        self.authority = f"{host}:{port}" if port != 443 else host
        self.max_connections, self.max_streams = max_connections, max_streams
        self.timeout_s = timeout_s
        self.traffic = Traffic()  # latency, status classes, in flight: read by /metrics
        self.connections: list[_Connection] = []
        self.connects = 0  # connections opened so far (for tests)
        self._in_flight = asyncio.Semaphore(max_in_flight or max_connections * max_streams)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._connecting = self._closed = False
        self._failed_until = 0.0
        self._last_error: H2Error | SetupError | None = None

    async def send_many(
        self,
        method: str,
        paths: str | Sequence[str],
        headers: Headers,
        bodies: bytes | Sequence[bytes],
    ) -> Replies:
        """See :meth:`worker.senders.exchange.Exchange.send_many`: a coroutine each."""
        replies = Replies([0] * batch_size(paths, bodies))

        async def one(i: int) -> None:
            path = paths if isinstance(paths, str) else paths[i]
            body = bodies if isinstance(bodies, bytes) else bodies[i]
            try:
                shared = isinstance(paths, str)
                response = await self.request(method, path, headers, body, index_path=shared)
            except H2Error as exc:
                replies.errors[i] = exc
                return
            replies.status[i] = response.status
            if not 200 <= response.status < 300:
                replies.answers[i] = response

        await asyncio.gather(*(one(i) for i in range(len(replies.status))))
        return replies

    async def request(
        self, method: str, path: str, headers: Headers, body: bytes, *, index_path: bool = False
    ) -> H2Response:
        """One request; raises :class:`H2Error`, or SetupError when HTTP/2 is refused."""
        async with self._in_flight:
            started = asyncio.get_running_loop().time()
            self.traffic.in_flight += 1
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await self._reissuing(method, path, headers, body, index_path)
            except TimeoutError:
                self.traffic.failed()
                raise H2Error("TIMEOUT", retryable=True) from None
            except H2Error:
                self.traffic.failed()
                raise
            finally:
                self.traffic.in_flight -= 1
            self.traffic.answered(asyncio.get_running_loop().time() - started, response.status)
            return response

    async def _reissuing(
        self, method: str, path: str, headers: Headers, body: bytes, index_path: bool
    ) -> H2Response:
        for _ in range(MAX_REISSUES + 1):
            conn = await self._acquire()
            try:
                return await conn.exchange(method, path, headers, body, index_path)
            except H2Error as exc:
                if not exc.unprocessed:
                    raise
        raise H2Error("not processed after re-issues", retryable=True)

    async def _acquire(self) -> _Connection:
        """A connection with a free stream: opens one, or waits for a stream to end."""
        while True:
            if self._closed:
                raise H2Error("pool closed", retryable=True)
            best = max(self.connections, key=lambda c: c.free_streams, default=None)
            if best is not None and best.free_streams > 0:
                return best
            usable = sum(c.usable for c in self.connections)
            if not usable and self._last_error and time.monotonic() < self._failed_until:
                raise self._last_error  # nothing to wait for: no reconnect storm
            if not self._connecting and usable < self.max_connections:
                await self._connect()
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # the wake it was given goes to the next in line
                raise

    async def _connect(self) -> None:
        self._connecting = True
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self), self.host, self.port, ssl=self.ssl_context
            )
            try:
                await conn.ready
            except BaseException:  # refused, lost, or the request's deadline
                conn.close()
                raise
            self.connects += 1
            self.connections.append(conn)
        except (OSError, H2Error, SetupError) as exc:
            if not isinstance(exc, SetupError):  # no HTTP/2 stays a SetupError
                exc = H2Error(f"connect failed: {exc!r}", retryable=True)
            self._last_error, self._failed_until = exc, time.monotonic() + RECONNECT_BACKOFF_S
            raise exc from None
        finally:
            self._connecting = False
            self._wake(everyone=True)

    def _wake(self, *, everyone: bool = False) -> None:
        """Let a request waiting for a stream look again (all of them on bigger changes)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    async def close(self) -> None:
        """Let in-flight requests finish (within their deadlines), then close."""
        self._closed = True
        while pending := [s.future for c in self.connections for s in c.streams.values()]:
            await asyncio.wait(pending)
        for conn in list(self.connections):
            conn.close()
        self._wake(everyone=True)
