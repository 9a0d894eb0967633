"""The emulators' HTTP/2 server, driven frame by frame.

A raw client writes frames built with :mod:`pushfan.http2` (header blocks from
``hpack.Encoder``, which indexes and Huffman-codes like real clients) and decodes what
comes back with ``hpack.Decoder``. Most tests run on the ``frames`` engine (the default);
those about behaviour both engines share run on ``h2`` too. Error codes are the frames
engine's (``h2`` picks its own). One test runs httpx against both engines.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import hpack
import httpx
import pytest

from pushfan import http2
from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.emulators.server import HttpServer, Request, Response, ServerOptions
from pushfan.http2 import (
    COMPRESSION_ERROR,
    DATA,
    END_HEADERS,
    END_STREAM,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    PING,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)

TIMEOUT_S = 5.0
QUIET_S = 0.3  # how long "nothing more arrives" is watched for
Engine = Literal["frames", "h2"]
ENGINES: list[Engine] = ["frames", "h2"]


class Frame(NamedTuple):
    kind: int
    flags: int
    stream_id: int
    payload: bytes


class Recorder:
    """The handler: records requests; the path picks the answer."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        if request.path.startswith("/big/"):
            return Response(200, big_body(int(request.path[len("/big/") :])))
        if request.path == "/slow":
            return Response(200, b"slow", delay=0.2)
        if request.path == "/empty":
            return Response(204)
        echo = {
            "method": request.method,
            "headers": request.headers,
            "body": request.body.decode("latin-1"),
        }
        return Response(200, json.dumps(echo).encode(), [("content-type", "application/json")])


def big_body(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


class Peer:
    """A raw HTTP/2 client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = http2.FrameReader(1 << 24)
        self.queue: deque[Frame] = deque()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.server_settings: dict[int, int] = {}
        self.eof = False

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def next(self, within: float = TIMEOUT_S) -> Frame | None:
        """The next frame from the server; None once it closed the connection."""
        while not self.queue and not self.eof:
            data = await asyncio.wait_for(self.reader.read(1 << 16), within)
            self.eof = not data
            self.queue.extend(Frame(*f) for f in self.frames.feed(data))
        return self.queue.popleft() if self.queue else None

    async def until(self, done: Callable[[Frame], bool]) -> list[Frame]:
        """Frames up to and including the first for which ``done`` is true."""
        frames: list[Frame] = []
        while True:
            got = await self.next()
            assert got is not None, f"connection closed; frames so far: {frames}"
            frames.append(got)
            if done(got):
                return frames

    async def quiet(self) -> list[Frame]:
        """Whatever arrives within :data:`QUIET_S` (tests expect nothing)."""
        frames: list[Frame] = []
        try:
            while (got := await self.next(QUIET_S)) is not None:
                frames.append(got)
        except TimeoutError:
            pass
        return frames

    async def closed(self) -> list[Frame]:
        """Every frame until the server closes the connection."""
        frames = []
        while (got := await self.next()) is not None:
            frames.append(got)
        return frames

    def headers(
        self,
        stream_id: int,
        path: str = "/echo",
        *,
        method: str = "POST",
        end_stream: bool = True,
        extra: Iterable[tuple[str, str]] = (),
    ) -> bytes:
        block = self.encoder.encode(
            [
                (":method", method),
                (":scheme", "http"),
                (":authority", "test"),
                (":path", path),
                *extra,
            ]
        )
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, stream_id, block)

    def decode(self, block: bytes) -> dict[str, str]:
        return {n.decode(): v.decode() for n, v in self.decoder.decode(block, raw=True)}

    async def response(self, stream_id: int) -> tuple[dict[str, str], bytes]:
        """The response on ``stream_id`` (other streams' frames are dropped)."""
        fields: dict[str, str] = {}
        body = b""
        frames = await self.until(
            lambda f: (
                f.stream_id == stream_id
                and (
                    f.kind == RST_STREAM
                    or (f.kind in (HEADERS, DATA) and bool(f.flags & END_STREAM))
                )
            )
        )
        for f in frames:
            if f.stream_id != stream_id:
                continue
            assert f.kind != RST_STREAM, f"stream {stream_id} reset: {http2.u32(f.payload)}"
            if f.kind == HEADERS:
                fields.update(self.decode(f.payload))
            elif f.kind == DATA:
                body += f.payload
        return fields, body


async def connect(
    server: HttpServer,
    settings: dict[int, int] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
) -> Peer:
    """Preface, SETTINGS, and the server's SETTINGS up to its ACK of ours (ACKed too)."""
    peer = await open_peer(server, tls=tls)
    peer.send(http2.PREFACE, http2.settings_frame(settings or {}))
    for f in await peer.until(lambda f: f.kind == SETTINGS and bool(f.flags & http2.ACK)):
        if f.kind == SETTINGS and not f.flags & http2.ACK:
            peer.server_settings = http2.parse_settings(f.payload)
            peer.send(frame(SETTINGS, http2.ACK, 0))
    return peer


async def open_peer(server: HttpServer, *, tls: ssl.SSLContext | None = None) -> Peer:
    reader, writer = await asyncio.open_connection(server.host, server.port, ssl=tls)
    return Peer(reader, writer)


def goaway_code(frames: list[Frame]) -> int:
    goaways = [f for f in frames if f.kind == GOAWAY]
    assert goaways, f"no GOAWAY in {frames}"
    return http2.u32(goaways[-1].payload, 4)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    directory: Path = tmp_path_factory.mktemp("http2-credentials")
    return ensure_credentials(directory, token_uri="https://127.0.0.1:1/token")


Serve = Callable[..., Awaitable[tuple[HttpServer, Recorder]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a plaintext server (HTTP/2 found by the preface) with these options."""
    servers: list[HttpServer] = []

    async def start(**options: Any) -> tuple[HttpServer, Recorder]:
        recorder = Recorder()
        server = HttpServer(recorder, options=ServerOptions(**options))
        await server.start()
        servers.append(server)
        return server, recorder

    yield start
    for server in servers:
        await server.stop()


# -- requests and responses ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_request_is_answered(serve: Serve, engine: Engine) -> None:
    server, recorder = await serve(engine=engine, max_concurrent_streams=77)
    peer = await connect(server)
    assert peer.server_settings[http2.MAX_CONCURRENT_STREAMS] == 77
    assert peer.server_settings[http2.INITIAL_WINDOW_SIZE] == 1 << 20

    peer.send(
        peer.headers(1, end_stream=False, extra=[("x-thing", "A b"), ("x-thing", "last")]),
        frame(DATA, END_STREAM, 1, b"hello"),
    )
    headers, body = await peer.response(1)

    assert headers[":status"] == "200"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    echo = json.loads(body)
    assert (echo["method"], echo["body"]) == ("POST", "hello")
    assert echo["headers"]["x-thing"] == "last"  # a repeated header keeps its last value
    (request,) = recorder.requests
    assert (request.path, request.http2) == ("/echo", True)


async def test_the_connection_window_is_opened_and_a_bodyless_answer_ends_in_headers(
    serve: Serve,
) -> None:
    server, _ = await serve()
    peer = await open_peer(server)
    peer.send(http2.PREFACE, http2.settings_frame({}))
    first, second = await peer.next(), await peer.next()
    assert first is not None
    assert first.kind == SETTINGS
    assert second == Frame(WINDOW_UPDATE, 0, 0, ((1 << 20) - 65535).to_bytes(4, "big"))

    peer.send(peer.headers(1, "/empty", method="GET"))
    frames = await peer.until(lambda f: f.stream_id == 1)
    assert frames[-1].kind == HEADERS
    assert frames[-1].flags & END_STREAM
    assert peer.decode(frames[-1].payload) == {":status": "204"}


@pytest.mark.parametrize("engine", ENGINES)
async def test_headers_span_continuation_frames_with_padding_and_priority(
    serve: Serve, engine: Engine
) -> None:
    server, recorder = await serve(engine=engine)
    peer = await connect(server)
    block = peer.encoder.encode(
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "test"),
            (":path", "/echo"),
            ("x-long", "v" * 5000),
        ]
    )
    padding = 7
    first = bytes([padding]) + (0).to_bytes(4, "big") + b"\x10" + block[:100] + b"\0" * padding
    peer.send(
        frame(HEADERS, END_STREAM | http2.PADDED | http2.PRIORITY_FLAG, 1, first),
        frame(http2.CONTINUATION, 0, 1, block[100:2000]),
        frame(http2.CONTINUATION, END_HEADERS, 1, block[2000:]),
    )
    headers, _ = await peer.response(1)

    assert headers[":status"] == "200"
    assert recorder.requests[0].headers["x-long"] == "v" * 5000


@pytest.mark.parametrize("engine", ENGINES)
async def test_padded_data_is_stripped(serve: Serve, engine: Engine) -> None:
    server, recorder = await serve(engine=engine)
    peer = await connect(server)
    peer.send(
        peer.headers(1, end_stream=False),
        frame(DATA, http2.PADDED, 1, b"\x0a" + b"hello " + b"\0" * 10),
        frame(DATA, http2.PADDED | END_STREAM, 1, b"\x03world\0\0\0"),
    )
    _, body = await peer.response(1)

    assert json.loads(body)["body"] == "hello world"
    assert recorder.requests[0].body == b"hello world"


async def test_an_open_streams_data_is_credited_back_padding_and_all(serve: Serve) -> None:
    server, recorder = await serve()
    peer = await connect(server)
    peer.send(
        peer.headers(1, end_stream=False),
        frame(DATA, http2.PADDED, 1, b"\x0a" + b"hello " + b"\0" * 10),
    )
    credit = await peer.until(lambda f: f.kind == WINDOW_UPDATE and f.stream_id == 1)
    assert http2.u32(credit[-1].payload) == 17  # pad length byte + 6 + 10 bytes of padding

    peer.send(frame(DATA, END_STREAM, 1, b"world"))
    await peer.response(1)
    assert recorder.requests[0].body == b"hello world"


async def test_received_data_is_credited_back_on_the_connection(serve: Serve) -> None:
    server, recorder = await serve(initial_window_size=65535)
    peer = await connect(server)
    chunk = b"x" * 16384
    peer.send(
        peer.headers(1, end_stream=False),
        frame(DATA, 0, 1, chunk),
        frame(DATA, 0, 1, chunk),
        frame(DATA, END_STREAM, 1, chunk),
    )
    frames = await peer.until(lambda f: f.stream_id == 1 and bool(f.flags & END_STREAM))
    frames += await peer.quiet()

    credited = sum(
        http2.u32(f.payload) for f in frames if f.kind == WINDOW_UPDATE and not f.stream_id
    )
    assert credited >= 32768  # batched: at least half the 65,535-byte window back
    assert recorder.requests[0].body == chunk * 3


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_large_body_follows_the_clients_windows_and_frame_size(
    serve: Serve, engine: Engine
) -> None:
    server, _ = await serve(engine=engine)
    peer = await connect(server, {http2.INITIAL_WINDOW_SIZE: 1000})
    size = 100_000
    received: list[Frame] = []

    def total() -> int:
        return sum(len(f.payload) for f in received if f.kind == DATA)

    async def until_total(n: int) -> None:
        while total() < n:
            got = await peer.next()
            assert got is not None
            received.append(got)
        assert total() == n
        received.extend(await peer.quiet())
        assert total() == n, "DATA beyond the client's windows"

    peer.send(peer.headers(1, f"/big/{size}", method="GET"))
    await until_total(1000)  # the stream window
    peer.send(http2.settings_frame({http2.INITIAL_WINDOW_SIZE: 3000}))  # +2000 on open streams
    await until_total(3000)
    peer.send(http2.window_update(1, 1 << 20))
    await until_total(65535)  # now the connection window
    peer.send(http2.window_update(0, 1 << 20))
    received.extend(await peer.until(lambda f: f.kind == DATA and bool(f.flags & END_STREAM)))

    data = [f for f in received if f.kind == DATA]
    assert b"".join(f.payload for f in data) == big_body(size)
    assert max(len(f.payload) for f in data) <= 16384  # the client's MAX_FRAME_SIZE


@pytest.mark.parametrize("engine", ENGINES)
async def test_ping_is_acked(serve: Serve, engine: Engine) -> None:
    server, _ = await serve(engine=engine)
    peer = await connect(server)
    peer.send(frame(PING, 0, 0, b"12345678"))
    frames = await peer.until(lambda f: f.kind == PING)
    assert frames[-1] == Frame(PING, http2.ACK, 0, b"12345678")


# -- refusing streams ----------------------------------------------------------------------


async def test_streams_beyond_the_limit_are_refused_and_still_decoded(serve: Serve) -> None:
    # (h2 answers a stream too many with GOAWAY PROTOCOL_ERROR instead)
    server, recorder = await serve(max_concurrent_streams=2)
    peer = await connect(server)
    # Stream 5 adds a header to the client's HPACK table; stream 7 refers to it by index,
    # so the server must have decoded the refused stream's block.
    peer.send(
        peer.headers(1, "/slow"),
        peer.headers(3, "/slow"),
        peer.headers(5, extra=[("x-new", "indexed")]),
    )
    refused = await peer.until(lambda f: f.kind == RST_STREAM)
    assert refused[-1] == Frame(RST_STREAM, 0, 5, http2.REFUSED_STREAM.to_bytes(4, "big"))
    await peer.response(1)
    await peer.response(3)

    peer.send(peer.headers(7, extra=[("x-new", "indexed")]))
    headers, _ = await peer.response(7)

    assert headers[":status"] == "200"
    assert [r.path for r in recorder.requests] == ["/slow", "/slow", "/echo"]
    assert recorder.requests[-1].headers["x-new"] == "indexed"


async def test_goaway_after_n_requests_refuses_later_streams(serve: Serve) -> None:
    # (h2 sends nothing at all after its GOAWAY: it will not reset a stream then)
    server, recorder = await serve(goaway_after=2)
    peer = await connect(server)
    peer.send(peer.headers(1), peer.headers(3), peer.headers(5))
    frames = await peer.until(lambda f: f.kind == RST_STREAM and f.stream_id == 5)

    goaway = next(f for f in frames if f.kind == GOAWAY)
    assert (http2.u32(goaway.payload), http2.u32(goaway.payload, 4)) == (3, http2.NO_ERROR)
    assert http2.u32(frames[-1].payload) == http2.REFUSED_STREAM
    answered = {f.stream_id for f in frames if f.kind in (HEADERS, DATA)}
    assert answered == {1, 3}

    peer.send(peer.headers(7))
    later = await peer.until(lambda f: f.stream_id == 7)
    assert later[-1].kind == RST_STREAM
    assert http2.u32(later[-1].payload) == http2.REFUSED_STREAM
    assert len(recorder.requests) == 2


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_reset_stream_gets_no_delayed_response(serve: Serve, engine: Engine) -> None:
    server, recorder = await serve(engine=engine)
    peer = await connect(server)
    peer.send(peer.headers(1, "/slow"))
    peer.send(http2.rst_stream(1, http2.CANCEL), peer.headers(3))
    frames = await peer.until(lambda f: f.stream_id == 3 and bool(f.flags & END_STREAM))
    await asyncio.sleep(0.3)  # past the 0.2 s delay
    peer.send(frame(PING, 0, 0, b"syncsync"))  # anything still buffered goes out with the ACK
    frames += await peer.until(lambda f: f.kind == PING)

    assert [r.path for r in recorder.requests] == ["/slow", "/echo"]  # it was handled...
    assert not [f for f in frames if f.stream_id == 1]  # ...but nothing was sent for it


# -- errors --------------------------------------------------------------------------------


def _headers_block(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(http2.encode_field(name, value) for name, value in fields)


_REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo")]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([f for f in _REQUEST if f[0] != b":path"], id="no-path"),
        pytest.param([f for f in _REQUEST if f[0] != b":method"], id="no-method"),
        pytest.param([f for f in _REQUEST if f[0] != b":scheme"], id="no-scheme"),
        pytest.param([*_REQUEST, (b"X-Upper", b"1")], id="upper-case-name"),
        pytest.param([(b"x-a", b"1"), *_REQUEST], id="pseudo-after-regular"),
        pytest.param([*_REQUEST, (b":status", b"200")], id="response-pseudo"),
        pytest.param([*_REQUEST, (b"connection", b"close")], id="connection-header"),
        pytest.param([*_REQUEST, (b"te", b"gzip")], id="te-not-trailers"),
    ],
)
async def test_a_malformed_request_is_reset_and_never_handled(
    serve: Serve, fields: list[tuple[bytes, bytes]]
) -> None:
    server, recorder = await serve()
    peer = await connect(server)
    peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, _headers_block(fields)))
    reset = await peer.until(lambda f: f.stream_id == 1)
    assert reset[-1] == Frame(RST_STREAM, 0, 1, PROTOCOL_ERROR.to_bytes(4, "big"))

    peer.send(peer.headers(3))  # the connection goes on
    headers, _ = await peer.response(3)
    assert headers[":status"] == "200"
    assert [r.path for r in recorder.requests] == ["/echo"]


def _oversized() -> bytes:
    return frame(DATA, 0, 1, b"x" * 16385)


_ERRORS = [
    ("oversized-frame", lambda p: _oversized(), FRAME_SIZE_ERROR),
    ("short-ping", lambda p: frame(PING, 0, 0, b"1234567"), FRAME_SIZE_ERROR),
    ("ping-on-stream", lambda p: frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
    ("settings-length", lambda p: frame(SETTINGS, 0, 0, b"\0" * 5), FRAME_SIZE_ERROR),
    ("data-on-0", lambda p: frame(DATA, END_STREAM, 0, b"x"), PROTOCOL_ERROR),
    ("headers-on-0", lambda p: p.headers(0), PROTOCOL_ERROR),
    ("even-stream", lambda p: p.headers(2), PROTOCOL_ERROR),
    ("decreasing", lambda p: p.headers(5, end_stream=False) + p.headers(3), PROTOCOL_ERROR),
    ("data-on-idle", lambda p: frame(DATA, 0, 9, b"x"), PROTOCOL_ERROR),
    ("lone-continuation", lambda p: frame(http2.CONTINUATION, 4, 1, b"\x82"), PROTOCOL_ERROR),
    (
        "interrupted-block",
        lambda p: frame(HEADERS, 0, 1, b"\x82") + frame(PING, 0, 0, b"12345678"),
        PROTOCOL_ERROR,
    ),
    ("push-promise", lambda p: frame(http2.PUSH_PROMISE, 4, 0, b"\0\0\0\2"), PROTOCOL_ERROR),
    ("window-update-0", lambda p: http2.window_update(0, 0), PROTOCOL_ERROR),
    ("rst-on-0", lambda p: http2.rst_stream(0, 0), PROTOCOL_ERROR),
    ("priority-length", lambda p: frame(http2.PRIORITY, 0, 1, b"\0"), FRAME_SIZE_ERROR),
    ("bad-hpack", lambda p: frame(HEADERS, 5, 1, b"\xff\xff\xff\xff\x0f"), COMPRESSION_ERROR),
]


@pytest.mark.parametrize(("build", "code"), [pytest.param(b, c, id=i) for i, b, c in _ERRORS])
async def test_a_protocol_error_is_answered_with_goaway_and_close(
    serve: Serve, build: Callable[[Peer], bytes], code: int
) -> None:
    server, recorder = await serve()
    peer = await connect(server)
    peer.send(build(peer))
    frames = await peer.closed()
    assert goaway_code(frames) == code
    assert not recorder.requests


async def test_data_beyond_the_advertised_window_is_a_flow_control_error(serve: Serve) -> None:
    server, _ = await serve(initial_window_size=100)
    peer = await connect(server)  # ACKs our SETTINGS: the 100-byte window applies
    peer.send(peer.headers(1, end_stream=False), frame(DATA, END_STREAM, 1, b"x" * 101))
    assert goaway_code(await peer.closed()) == http2.FLOW_CONTROL_ERROR


async def test_the_preface_must_end_with_settings(serve: Serve) -> None:
    server, _ = await serve()
    peer = await open_peer(server)
    peer.send(http2.PREFACE, frame(PING, 0, 0, b"12345678"))
    assert goaway_code(await peer.closed()) == PROTOCOL_ERROR


async def test_a_client_goaway_closes_the_connection(serve: Serve) -> None:
    server, _ = await serve()
    peer = await connect(server)
    peer.send(peer.headers(1), http2.goaway(1, http2.NO_ERROR))
    frames = await peer.closed()
    assert not [f for f in frames if f.kind == GOAWAY]  # not an error: just closed


# -- TLS -----------------------------------------------------------------------------------


async def test_alpn_h2_reaches_the_frames_engine(creds: Credentials) -> None:
    recorder = Recorder()
    server = HttpServer(recorder, ssl_context=creds.server_ssl_context())
    await server.start()
    try:
        tls = creds.client_ssl_context()
        tls.set_alpn_protocols(["h2"])
        peer = await connect(server, tls=tls)
        peer.send(
            peer.headers(1, "/big/70000", method="GET"),
            http2.window_update(0, 1 << 20),
            http2.window_update(1, 1 << 20),
        )
        headers, body = await peer.response(1)
        assert (headers[":status"], body) == ("200", big_body(70000))

        bad = await open_peer(server, tls=tls)
        bad.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # ALPN said h2: no preface, an error
        assert goaway_code(await bad.closed()) == PROTOCOL_ERROR
    finally:
        await server.stop()


@pytest.mark.parametrize("engine", ENGINES)
async def test_httpx_gets_answers_from_both_engines(creds: Credentials, engine: Engine) -> None:
    recorder = Recorder()
    options = ServerOptions(engine=engine)
    server = HttpServer(recorder, ssl_context=creds.server_ssl_context(), options=options)
    await server.start()
    try:
        async with httpx.AsyncClient(
            http2=True, verify=creds.client_ssl_context(), base_url=server.url
        ) as client:
            echo = await client.post("/echo", content=b"payload", headers={"x-mine": "Yes"})
            big = await client.get("/big/200000")
    finally:
        await server.stop()

    assert echo.http_version == "HTTP/2"
    assert echo.status_code == 200
    assert echo.json()["body"] == "payload"
    assert echo.json()["headers"]["x-mine"] == "Yes"
    assert big.content == big_body(200_000)
    assert [r.path for r in recorder.requests] == ["/echo", "/big/200000"]
