"""A scripted HTTP/2 peer for the client's tests: a TLS server whose every accepted
connection runs a script that reads and writes raw frames.

A script either works frame by frame (:meth:`Peer.next_frame`, :meth:`Peer.next_of`) or
request by request (:meth:`Peer.next_request`, :meth:`Peer.answer`,
:meth:`Peer.send_bodies`), which keeps track of the client's streams, its header blocks
(CONTINUATION included) and its flow-control windows, and gives the client's request
bodies their window back as they arrive.

Also here: :func:`pending_streams`, the one place a test looks inside the pool, and
:func:`assert_complete`, the :class:`~worker.senders.exchange.Replies` contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import hpack

from pushfan import http2
from pushfan.emulators.credentials import Credentials
from worker.senders.exchange import Replies
from worker.senders.h2client import H2Pool

Frame = tuple[int, int, int, bytes]


@dataclass(slots=True)
class Request:
    """A request as the peer received it."""

    connection: int  # which connection of this server (0 for the first accepted)
    stream_id: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def path(self) -> str:
        return self.headers[b":path"].decode()


@dataclass(slots=True)
class _Open:
    headers: dict[bytes, bytes]
    body: bytearray = field(default_factory=bytearray)


class Peer:
    """One accepted client connection, read and written frame by frame."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int = 0
    ) -> None:
        self.reader, self.writer = reader, writer
        self.number = number
        self.frames = http2.FrameReader(max_frame_size=1 << 20)
        self.pending: deque[Frame] = deque()
        self.decoder = hpack.Decoder()
        self.encoder = hpack.Encoder()
        # request by request: what the client sent, and what it lets us send
        self.client_settings: dict[int, int] = {}
        self.initial_window = http2.DEFAULT_WINDOW
        self.send_window = http2.DEFAULT_WINDOW
        self.stream_windows: dict[int, int] = {}
        self.open: dict[int, _Open] = {}
        self.block: tuple[int, int, list[bytes]] | None = None
        self.completed: deque[Request] = deque()
        self.received: list[Request] = []
        self.resets: list[tuple[int, int]] = []  # (stream id, error code) the client sent
        self.goaways: list[tuple[int, int]] = []  # (last stream id, error code)
        self.window_updates: list[tuple[int, int]] = []  # (stream id, increment)

    async def preface(self, settings: dict[int, int] | None = None) -> dict[int, int]:
        """Read the client's preface and SETTINGS; send ours; return the client's."""
        assert await self.reader.readexactly(len(http2.PREFACE)) == http2.PREFACE
        got = await self.next_frame()
        assert got[0] == http2.SETTINGS
        self.handle(got)
        self.send(http2.settings_frame(settings or {http2.MAX_CONCURRENT_STREAMS: 100}))
        return http2.parse_settings(got[3])

    # -- frame by frame -------------------------------------------------------------------

    async def next_frame(self) -> Frame:
        while not self.pending:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.pending.extend(self.frames.feed(data))
        return self.pending.popleft()

    async def next_of(self, kind: int) -> Frame:
        while True:
            got = await self.next_frame()
            if got[0] == kind:
                return got

    async def request(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """The next request: stream id, headers and body."""
        got = await self.next_request()
        return got.stream_id, got.headers, got.body

    # -- request by request ---------------------------------------------------------------

    def handle(self, got: Frame) -> None:
        """Account for one frame from the client."""
        kind, flags, stream_id, payload = got
        if kind in (http2.HEADERS, http2.CONTINUATION):
            if kind == http2.HEADERS:
                assert self.block is None, "HEADERS inside another header block"
                fragment = http2.strip_padding(flags, payload, priority=True)
                self.block = (stream_id, flags, [fragment])
            else:
                assert self.block is not None, "stray CONTINUATION"
                assert self.block[0] == stream_id, "CONTINUATION of another stream"
                self.block[2].append(payload)
            if flags & http2.END_HEADERS:
                assert self.block is not None
                sid, first_flags, fragments = self.block
                self.block = None
                headers = dict(self.decoder.decode(b"".join(fragments), raw=True))
                assert sid not in self.open, f"stream {sid} opened twice"
                self.open[sid] = _Open(headers)
                self.stream_windows[sid] = self.initial_window
                if first_flags & http2.END_STREAM:
                    self._complete(sid)
        elif kind == http2.DATA:
            assert self.block is None, "DATA inside a header block"
            body = http2.strip_padding(flags, payload)
            if payload:  # give the window back at once: the client's bodies never wait on us
                self.send(http2.window_update(0, len(payload)))
                if not flags & http2.END_STREAM:
                    self.send(http2.window_update(stream_id, len(payload)))
            request = self.open.get(stream_id)
            if request is not None:
                request.body += body
                if flags & http2.END_STREAM:
                    self._complete(stream_id)
        elif kind == http2.WINDOW_UPDATE:
            increment = http2.u32(payload) & http2.MAX_WINDOW
            self.window_updates.append((stream_id, increment))
            if stream_id == 0:
                self.send_window += increment
            elif stream_id in self.stream_windows:
                self.stream_windows[stream_id] += increment
        elif kind == http2.RST_STREAM:
            self.resets.append((stream_id, http2.u32(payload)))
            self.open.pop(stream_id, None)
            self.stream_windows.pop(stream_id, None)
        elif kind == http2.SETTINGS and not flags & http2.ACK:
            values = http2.parse_settings(payload)
            self.client_settings.update(values)
            window = values.get(http2.INITIAL_WINDOW_SIZE)
            if window is not None:
                delta, self.initial_window = window - self.initial_window, window
                for sid in self.stream_windows:
                    self.stream_windows[sid] += delta
            self.send(http2.frame(http2.SETTINGS, http2.ACK, 0))
        elif kind == http2.GOAWAY:
            self.goaways.append((http2.u32(payload) & http2.MAX_STREAM_ID, http2.u32(payload, 4)))

    def _complete(self, stream_id: int) -> None:
        request = self.open[stream_id]
        done = Request(self.number, stream_id, request.headers, bytes(request.body))
        self.completed.append(done)
        self.received.append(done)

    async def next_request(self) -> Request:
        """The next request whose END_STREAM has arrived."""
        while not self.completed:
            self.handle(await self.next_frame())
        return self.completed.popleft()

    async def requests(self, count: int) -> list[Request]:
        return [await self.next_request() for _ in range(count)]

    async def requests_until_idle(self, idle: float = 0.05) -> list[Request]:
        """Every request that arrives until none has for ``idle`` seconds (or the client
        closes the connection)."""
        got: list[Request] = []
        while True:
            try:
                async with asyncio.timeout(idle):
                    got.append(await self.next_request())
            except (TimeoutError, EOFError, ConnectionError):
                return got

    async def drain_until_closed(self) -> None:
        """Account for whatever the client sends until it closes the connection."""
        with contextlib.suppress(EOFError, ConnectionError):
            while True:
                self.handle(await self.next_frame())

    def response_frames(
        self,
        stream_id: int,
        status: int = 200,
        fields: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> list[bytes]:
        """HEADERS (and one DATA frame if ``body``) answering ``stream_id``; no flow control:
        for bodies that fit the windows (see :meth:`send_bodies` for the others)."""
        block = self.headers_block([(":status", str(status)), *fields])
        frames = [
            http2.frame(
                http2.HEADERS,
                http2.END_HEADERS | (0 if body else http2.END_STREAM),
                stream_id,
                block,
            )
        ]
        if body:
            frames.append(http2.frame(http2.DATA, http2.END_STREAM, stream_id, body))
            self.send_window -= len(body)
            self.stream_windows[stream_id] = self.stream_windows.get(stream_id, 0) - len(body)
        return frames

    def answer(
        self,
        stream_id: int,
        status: int = 200,
        fields: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        self.send(*self.response_frames(stream_id, status, fields, body))

    async def send_bodies(self, bodies: dict[int, bytes], frame_size: int = 16384) -> None:
        """DATA for every stream in ``bodies`` (END_STREAM on each last one), round robin,
        never beyond the windows the client gave: waits for its WINDOW_UPDATEs."""
        views = {sid: memoryview(body) for sid, body in bodies.items()}
        while views:
            sent = False
            for sid in list(views):
                if sid not in self.stream_windows:  # the client reset it
                    del views[sid]
                    continue
                view = views[sid]
                size = min(len(view), frame_size, self.send_window, self.stream_windows[sid])
                if size <= 0 and view:
                    continue
                end = http2.END_STREAM if size == len(view) else 0
                self.send(http2.frame(http2.DATA, end, sid, bytes(view[:size])))
                self.send_window -= size
                self.stream_windows[sid] -= size
                sent = True
                if end:
                    del views[sid]
                else:
                    views[sid] = view[size:]
            await self.writer.drain()
            if not sent:  # every stream waits for window
                self.handle(await self.next_frame())
            while self.pending:  # account for what has arrived meanwhile
                self.handle(self.pending.popleft())

    def headers_block(self, fields: list[tuple[str, str]]) -> bytes:
        return bytes(self.encoder.encode(fields))

    def headers(self, stream_id: int, fields: list[tuple[str, str]], *, end: bool) -> bytes:
        """One HEADERS frame (END_STREAM if ``end``)."""
        flags = http2.END_HEADERS | (http2.END_STREAM if end else 0)
        return http2.frame(http2.HEADERS, flags, stream_id, self.headers_block(fields))

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    def drop(self) -> None:
        """Cut the connection with no goodbye (no GOAWAY, no TLS close_notify)."""
        self.writer.transport.abort()


Script = Callable[[Peer], Awaitable[None]]


class PeerServer:
    """TLS servers on 127.0.0.1 that run a script per accepted connection, and the pools
    pointed at them; :meth:`close` closes both and re-raises a script's failure."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.servers: list[asyncio.Server] = []
        self.pools: list[H2Pool] = []
        self.scripts: list[asyncio.Future[None]] = []

    async def listen(self, script: Script) -> int:
        """A new server running ``script`` on every connection; returns its port."""
        numbers = itertools.count()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.scripts.append(done)
            try:
                await script(Peer(reader, writer, next(numbers)))
                await writer.drain()
            except (EOFError, ConnectionError):
                pass  # the client went away first: the test's own asserts judge that
            except BaseException as exc:  # an assert in the script: fail the test
                done.set_exception(exc)
            finally:
                if not done.done():
                    done.set_result(None)
                writer.close()

        context = self.creds.server_ssl_context()
        context.set_alpn_protocols(["h2"])
        server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
        self.servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def pool(self, port: int, **pool_options: float) -> H2Pool:
        pool = H2Pool(
            "127.0.0.1",
            port,
            ssl_context=self.creds.client_ssl_context(),
            **pool_options,  # type: ignore[arg-type]
        )
        self.pools.append(pool)
        return pool

    async def start(self, script: Script, **pool_options: float) -> H2Pool:
        """A server running ``script`` and a pool pointed at it."""
        return self.pool(await self.listen(script), **pool_options)

    async def finished(self) -> None:
        """Wait for every script to end; re-raise what failed in one."""
        for done in self.scripts:
            await asyncio.wait_for(asyncio.shield(done), 5)

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()
        try:
            await self.finished()
        finally:
            for server in self.servers:
                server.close()


def pending_streams(pool: H2Pool) -> int:
    """Streams the pool still tracks. The one look inside the pool: adapt it to a rewrite."""
    return sum(len(conn.streams) for conn in pool.connections)


def assert_complete(replies: Replies, count: int) -> None:
    """Every index has an HTTP status or an error, never both nor neither; answers are
    kept for the non-2xx statuses exactly."""
    assert len(replies.status) == count
    for i, status in enumerate(replies.status):
        if status:
            assert i not in replies.errors, f"index {i}: status {status} and {replies.errors[i]}"
        else:
            assert i in replies.errors, f"index {i}: neither a status nor an error"
    assert set(replies.errors) <= set(range(count))
    non_2xx = {i for i, s in enumerate(replies.status) if s and not 200 <= s < 300}
    assert set(replies.answers) == non_2xx
    for i, answer in replies.answers.items():
        assert answer.status == replies.status[i]


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for ``condition`` to hold (polling), failing after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)
