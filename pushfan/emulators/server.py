"""A small HTTP/2 and HTTP/1.1 server for the platform emulators.

HTTP/2 has two engines, chosen by :attr:`ServerOptions.engine`:

- ``"frames"`` (the default, :mod:`.server_frames`): frame-level HTTP/2 on the shared codec
  :mod:`pushfan.http2`, fast enough that one core serves well over 10,000 requests a
  second, so a benchmark measures the client and not the emulator;
- ``"h2"`` (:mod:`.server_h2`): the ``h2`` state machine, a real implementation not written
  here, for tests that check pushfan's own HTTP/2 client (which shares the codec with the
  frames engine) against an independent peer.

HTTP/1.1 runs on ``h11`` on the same port. With TLS, ALPN picks the protocol; when the
client offers no ALPN (aioapns does not) or speaks plaintext, the first bytes decide (the
HTTP/2 preface or not).

Requests are handled synchronously by a :data:`Handler` (no task per request); a
response's ``delay`` is applied with one timer, and everything a read produced is written
in one ``transport.write``.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import h11

from pushfan.emulators.server_frames import FramesEngine
from pushfan.emulators.server_h2 import H2Engine
from pushfan.http2 import PREFACE as H2_PREFACE

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
    engine: Literal["frames", "h2"] = "frames"  # see the module docstring


class Http2Engine(Protocol):
    """HTTP/2 on one :class:`ServerConnection` (its transport, handler and options)."""

    def start(self) -> None:
        """Send the server's connection preface (SETTINGS)."""

    def received(self, data: bytes) -> None:
        """Handle bytes from the client (the first ones start with the client preface)."""

    def lost(self) -> None:
        """The transport is gone: drop timers and state."""


class ServerConnection(asyncio.Protocol):
    """One client connection: picks HTTP/2 or HTTP/1.1, then feeds the engine."""

    def __init__(
        self, handler: Handler, options: ServerOptions, registry: set[ServerConnection]
    ) -> None:
        self.handler = handler
        self.options = options
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.engine: Http2Engine | None = None
        self.h1: h11.Connection | None = None
        self.buffer = b""
        self.connection_id = next(_connection_ids)

    def request(self, headers: dict[str, str], body: bytes) -> Response:
        """Answer one HTTP/2 request (``headers`` with its pseudo-headers)."""
        return self.handler(
            Request(
                method=headers.get(":method", ""),
                path=headers.get(":path", ""),
                headers=headers,
                body=body,
                http2=True,
                connection_id=self.connection_id,
            )
        )

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
        engine = self.engine
        if engine is not None:
            engine.received(data)
            return
        if self.h1 is None:
            self.buffer += data
            if len(self.buffer) < len(H2_PREFACE) and H2_PREFACE.startswith(self.buffer):
                return
            data, self.buffer = self.buffer, b""
            if data.startswith(H2_PREFACE):
                self._start_h2()
                assert self.engine is not None
                self.engine.received(data)
                return
            self._start_h1()
        self._h1_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.registry.discard(self)
        if self.engine is not None:
            self.engine.lost()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- HTTP/2 ---------------------------------------------------------------------------

    def _start_h2(self) -> None:
        engine: Http2Engine
        engine = H2Engine(self) if self.options.engine == "h2" else FramesEngine(self)
        self.engine = engine
        engine.start()

    # -- HTTP/1.1 -------------------------------------------------------------------------

    def _start_h1(self) -> None:
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
                    self.close()
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
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
        self._connections: set[ServerConnection] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> ServerConnection:
            conn = ServerConnection(self.handler, self.options, self._connections)
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
