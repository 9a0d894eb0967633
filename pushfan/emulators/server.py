"""A small HTTP/2 and HTTP/1.1 server for the platform emulators.

HTTP/2 runs on the ``h2`` state machine, a real implementation not written here, so our
own clients are checked against an independent peer. HTTP/1.1 runs on ``h11`` on the same
port. With TLS, ALPN picks the protocol; when the client offers no ALPN (aioapns does not)
or speaks plaintext, the first bytes decide (the HTTP/2 preface or not).

Requests are handled synchronously by a :data:`Handler` (no task per request); a
response's ``delay`` is applied with one timer, and everything a read produced is written
in one ``transport.write``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_connection_ids = itertools.count(1)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    http2: bool
    connection_id: int  # distinct per client connection (for per-connection platform rules)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0  # seconds to hold the response (scripted latency)


Handler = Callable[[Request], Response]


@dataclass
class ServerOptions:
    """HTTP/2 behaviour the tests may vary."""

    max_concurrent_streams: int = 1000
    initial_window_size: int = 1 << 20
    max_frame_size: int = 1 << 14
    goaway_after: int | None = None  # requests per connection before a graceful GOAWAY


class _Connection(asyncio.Protocol):
    def __init__(
        self, handler: Handler, options: ServerOptions, registry: set[_Connection]
    ) -> None:
        self.handler = handler
        self.options = options
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.mode: str | None = None  # "h2" | "h1"
        self.buffer = b""
        self.h2: h2.connection.H2Connection | None = None
        self.h1: h11.Connection | None = None
        self.streams: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        self.pending: dict[int, tuple[memoryview, bool]] = {}  # stream -> unsent body
        self.served = 0
        self.going_away = False
        self.goaway_last_stream = 0
        self.connection_id = next(_connection_ids)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn == "h2":
            self._start_h2()
        elif alpn == "http/1.1":
            self._start_h1()

    def data_received(self, data: bytes) -> None:
        if self.mode is None:
            self.buffer += data
            if len(self.buffer) < len(H2_PREFACE) and H2_PREFACE.startswith(self.buffer):
                return
            data, self.buffer = self.buffer, b""
            if data.startswith(H2_PREFACE):
                self._start_h2()
            else:
                self._start_h1()
        if self.mode == "h2":
            self._h2_received(data)
        else:
            self._h1_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.registry.discard(self)

    # -- HTTP/2 ---------------------------------------------------------------------------

    def _start_h2(self) -> None:
        self.mode = "h2"
        codes = h2.settings.SettingCodes
        conn = h2.connection.H2Connection(
            # Inbound headers stay validated (the emulators judge clients); our own
            # response headers need no checking.
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: self.options.max_concurrent_streams,
                codes.INITIAL_WINDOW_SIZE: self.options.initial_window_size,
                codes.MAX_FRAME_SIZE: self.options.max_frame_size,
            },
        )
        conn.initiate_connection()
        # The connection window is not a setting: open it as wide as the stream windows.
        extra = self.options.initial_window_size - 65535
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self.h2 = conn
        self._flush()

    def _h2_received(self, data: bytes) -> None:
        conn = self.h2
        assert conn is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self._close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = (list(event.headers or []), bytearray())
                if event.stream_ended is not None:
                    self._h2_request_done(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and event.data:
                    stream[1].extend(event.data)
                if event.flow_controlled_length:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_ended is not None:
                    self._h2_request_done(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._h2_request_done(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
                self.pending.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                self._h2_send_pending()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._flush()
                self._close()
                return
        self._flush()

    def _h2_request_done(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        raw_headers, body = stream
        if self.going_away and stream_id > self.goaway_last_stream:
            # GOAWAY promised the client these were never processed; keep the promise.
            assert self.h2 is not None
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        headers: dict[str, str] = {}
        for name, value in raw_headers:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        request = Request(
            method=headers.get(":method", ""),
            path=headers.get(":path", ""),
            headers=headers,
            body=bytes(body),
            http2=True,
            connection_id=self.connection_id,
        )
        response = self.handler(request)
        self.served += 1
        if response.delay > 0:
            asyncio.get_running_loop().call_later(
                response.delay, self._h2_respond_later, stream_id, response
            )
        else:
            self._h2_respond(stream_id, response)
        limit = self.options.goaway_after
        if limit is not None and self.served >= limit and not self.going_away:
            self.going_away = True
            self.goaway_last_stream = stream_id
            assert self.h2 is not None
            self.h2.close_connection(last_stream_id=stream_id)

    def _h2_respond_later(self, stream_id: int, response: Response) -> None:
        if self.transport is None or self.h2 is None:
            return
        self._h2_respond(stream_id, response)
        self._flush()

    def _h2_respond(self, stream_id: int, response: Response) -> None:
        conn = self.h2
        assert conn is not None
        headers = [(":status", str(response.status)), *response.headers]
        if response.body:
            headers.append(("content-length", str(len(response.body))))
        try:
            conn.send_headers(stream_id, headers, end_stream=not response.body)
        except h2.exceptions.ProtocolError:
            return  # the client reset the stream meanwhile (h2 may have forgotten it)
        if response.body:
            self.pending[stream_id] = (memoryview(response.body), True)
            self._h2_send_pending()

    def _h2_send_pending(self) -> None:
        conn = self.h2
        assert conn is not None
        for stream_id in list(self.pending):
            view, end = self.pending[stream_id]
            try:
                while view:
                    window = conn.local_flow_control_window(stream_id)
                    size = min(window, conn.max_outbound_frame_size, len(view))
                    if size <= 0:
                        break
                    conn.send_data(
                        stream_id, view[:size].tobytes(), end_stream=end and size == len(view)
                    )
                    view = view[size:]
            except (h2.exceptions.StreamClosedError, KeyError):
                self.pending.pop(stream_id, None)
                continue
            if view:
                self.pending[stream_id] = (view, end)
            else:
                del self.pending[stream_id]

    # -- HTTP/1.1 -------------------------------------------------------------------------

    def _start_h1(self) -> None:
        self.mode = "h1"
        self.h1 = h11.Connection(h11.SERVER)
        self.h1_request: h11.Request | None = None
        self.h1_body = bytearray()

    def _h1_received(self, data: bytes) -> None:
        conn = self.h1
        assert conn is not None
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                self._h1_send(Response(400, b"bad request"), close=True)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                self.h1_request = event
                self.h1_body = bytearray()
            elif isinstance(event, h11.Data):
                self.h1_body.extend(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._h1_request_done()
                if conn.our_state is h11.MUST_CLOSE:
                    self._close()
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _h1_request_done(self) -> None:
        req = self.h1_request
        assert req is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
        request = Request(
            method=req.method.decode(),
            path=req.target.decode("latin-1"),
            headers=headers,
            body=bytes(self.h1_body),
            http2=False,
            connection_id=self.connection_id,
        )
        response = self.handler(request)
        self.served += 1
        # HTTP/1.1 is strictly in order: a delayed response holds the connection anyway.
        self._h1_send(response)

    def _h1_send(self, response: Response, *, close: bool = False) -> None:
        conn = self.h1
        assert conn is not None
        assert self.transport is not None
        headers = [*response.headers, ("content-length", str(len(response.body)))]
        if close:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if response.body:
            out += conn.send(h11.Data(data=response.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        transport = self.transport

        def write() -> None:
            transport.write(out)
            if close:
                transport.close()

        if response.delay > 0:
            asyncio.get_running_loop().call_later(response.delay, write)
        else:
            write()

    # -- shared ---------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.h2 is not None and self.transport is not None:
            out = self.h2.data_to_send()
            if out:
                self.transport.write(out)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class HttpServer:
    """One listening socket serving ``handler`` over HTTP/2 and HTTP/1.1."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        options: ServerOptions | None = None,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.options = options or ServerOptions()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> _Connection:
            conn = _Connection(self.handler, self.options, self._connections)
            self._connections.add(conn)
            return conn

        self._server = await loop.create_server(
            factory, self.host, self.port, ssl=self.ssl_context, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def drop_connections(self) -> None:
        """Close every open connection abruptly (to test clients' reconnects)."""
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_connections()
            await self._server.wait_closed()
            self._server = None
