"""One HTTP/2 client connection on frames (``pushfan.http2``), driven by callbacks.

The pool (:mod:`worker.senders.h2client`) hands it requests as ``(batch, index)``; it
answers them into the batch's :class:`~worker.senders.exchange.Replies` as frames
arrive. There is no task, future or timer per request: a request costs a small stream
record, a header block made by concatenation and two frames in the connection's output,
which goes out in one ``transport.write`` per loop turn.

Header blocks: the fields a batch shares (method, scheme, authority, the credential and
platform headers, a shared path) are indexed in the server's table; once they are, the
block for them is the same bytes for every request and is reused until the table
changes. A per-request ``:path`` is spliced in as a literal without indexing.
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import hpack.exceptions

from pushfan import http2
from pushfan.errors import SetupError
from pushfan.metrics import Traffic
from worker.senders.exchange import H2Error, H2Response, Headers, Replies

if TYPE_CHECKING:
    from worker.senders.h2client import H2Pool

#: What we advertise: stream windows of 1 MiB and a 16 MiB connection window, so
#: responses never wait on us; acknowledged once half is consumed.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 1 << 24

_UNIQUE_PATH = frozenset({":path"})
_MARK = "\x00pushfan-path\x00"  # a path no request has: cut out of the cached block
_MARK_FIELD = http2.path_field(_MARK.encode())

_FRAME_HEADER = struct.Struct(">BHBBL")  # length as 1+2 bytes, type, flags, stream id
_unpack_header = _FRAME_HEADER.unpack_from
_pack_header = _FRAME_HEADER.pack
_path_field = http2.path_field
_END_HEADERS = http2.END_HEADERS
_END_HEADERS_AND_STREAM = http2.END_HEADERS | http2.END_STREAM
_HEADERS, _DATA, _END_STREAM = http2.HEADERS, http2.DATA, http2.END_STREAM


def _status(value: bytes) -> int:
    """A ``:status`` value as a number; 0 (malformed: the stream fails) unless it is three
    digits from 100 to 599."""
    if len(value) == 3 and value.isdigit() and b"1" <= value[:1] <= b"5":
        return int(value)
    return 0


@functools.lru_cache(maxsize=4096)
def _length_field(size: int) -> bytes:
    return http2.encode_field(b"content-length", str(size).encode())


class Batch:
    """The requests of one ``send_many`` call: which are still to start, and the replies.

    ``future`` gets the replies once every request is answered or failed.
    """

    __slots__ = (
        "authority",
        "bodies",
        "count",
        "deadline",
        "future",
        "headers",
        "keep_bodies",
        "left",
        "length_field",
        "method",
        "next",
        "paths",
        "queued",
        "redo",
        "reissues",
        "replies",
        "shared_path",
        "started",
        "traffic",
    )

    def __init__(
        self,
        method: str,
        authority: str,
        paths: str | Sequence[str],
        headers: Headers,
        bodies: bytes | Sequence[bytes],
        count: int,
        *,
        started: float,
        deadline: float,
        future: asyncio.Future[Replies],
        traffic: Traffic,
        keep_bodies: bool = False,
    ) -> None:
        self.method = method
        self.authority = authority
        self.paths = paths
        self.shared_path = paths if isinstance(paths, str) else None
        self.headers = tuple(headers)
        self.bodies = bodies
        # a shared body has one content-length field, made once
        self.length_field = (
            _length_field(len(bodies)) if isinstance(bodies, bytes) and bodies else b""
        )
        self.count = count
        self.left = count
        self.next = 0
        self.redo: list[int] = []  # requests to issue again (never processed)
        self.reissues = 0
        self.queued = False
        self.started = started
        self.deadline = deadline
        self.future = future
        self.traffic = traffic  # counts the requests that got no answer
        self.keep_bodies = keep_bodies  # keep 2xx headers and bodies too (``request``)
        self.replies = Replies([0] * count)

    def take(self) -> int:
        """The next request to start, or -1 when none is left to start."""
        if self.redo:
            return self.redo.pop()
        i = self.next
        if i < self.count:
            self.next = i + 1
            return i
        return -1

    @property
    def waiting(self) -> bool:
        """Some of its requests are still to start."""
        return bool(self.redo) or self.next < self.count

    def answered(self, i: int, status: int, headers: dict[str, str], body: bytes) -> None:
        self.replies.status[i] = status
        if self.keep_bodies or not 200 <= status < 300:
            self.replies.answers[i] = H2Response(status, headers, body)
        self._settled()

    def failed(self, i: int, error: H2Error) -> None:
        self.replies.errors[i] = error
        self.traffic.failed()
        self._settled()

    def fail_unstarted(self, error: H2Error | SetupError) -> None:
        """Every request not started yet fails with ``error`` (a setup error fails the
        whole call)."""
        if isinstance(error, SetupError):
            self.next, self.redo = self.count, []
            if not self.future.done():
                self.future.set_exception(error)
            return
        while (i := self.take()) >= 0:
            self.failed(i, error)

    def _settled(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.replies)


class _Stream:
    __slots__ = ("batch", "body", "headers", "index", "status", "unacked", "unsent", "window")

    def __init__(self, batch: Batch, index: int, window: int) -> None:
        self.batch = batch
        self.index = index
        self.window = window  # what we may still send on this stream
        self.unsent: memoryview | None = None
        self.status = 0
        self.headers: dict[str, str] | None = None  # kept only when the answer is wanted
        self.body: bytearray | None = None
        self.unacked = 0  # response bytes received and not yet given back as window


class Connection(asyncio.Protocol):
    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.traffic: Traffic = pool.traffic
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()  # the start of a frame not wholly received yet
        self.decoder = http2.HeaderDecoder()
        self.encoder = http2.IndexingEncoder(pool.encoder)
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, None] = {}  # streams with body bytes waiting for window
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
        self.closed = False  # we closed it: later frames are not read, nothing is written
        self.dirty = False
        self.released = False  # a stream ended: the pool may start waiting requests
        self.now = self.loop.time()
        self.ready: asyncio.Future[None] = self.loop.create_future()
        # the cached header block of the batch last started here
        self._block_of: Batch | None = None
        self._block_generation = -1
        self._head = self._tail = b""

    @property
    def free_streams(self) -> int:
        if not self.usable:
            return 0
        return min(self.max_concurrent, self.pool.max_streams) - len(self.streams)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.ready.set_exception(SetupError("the server did not agree to HTTP/2 (ALPN h2)"))
            transport.close()
            return
        settings = {http2.ENABLE_PUSH: 0, http2.INITIAL_WINDOW_SIZE: STREAM_WINDOW}
        self.out.append(http2.PREFACE + http2.settings_frame(settings))
        self.out.append(http2.window_update(0, CONNECTION_WINDOW - http2.DEFAULT_WINDOW))
        self.flush()
        # Usable once the server's SETTINGS arrive: until then its stream limit is unknown.

    def data_received(self, data: bytes) -> None:
        self.now = self.loop.time()
        if self.buffer:
            data = bytes(self.buffer + data)
        offset, end = 0, len(data)
        frame = self._frame
        try:
            # Frames are cut here rather than by a generator: this loop runs per response.
            while end - offset >= 9 and not self.closed:
                high, low, kind, flags, stream_id = _unpack_header(data, offset)
                size = (high << 16) | low
                if size > http2.DEFAULT_FRAME_SIZE:  # what we advertise
                    raise http2.ConnectionError_(http2.FRAME_SIZE_ERROR, f"a {size}-byte frame")
                start = offset + 9
                offset = start + size
                if offset > end:
                    offset = start - 9
                    break
                frame(kind, flags, stream_id & http2.MAX_STREAM_ID, data[start:offset])
        except http2.ConnectionError_ as exc:
            self._protocol_error(exc.code, str(exc))
            offset = end
        except hpack.exceptions.HPACKError as exc:
            self._protocol_error(http2.COMPRESSION_ERROR, f"header block: {exc}")
            offset = end
        self.buffer = bytearray(data[offset:]) if offset < end else bytearray()
        if self.released:
            self.released = False
            self.pool.pump()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(H2Error(f"connection lost: {exc}", retryable=True))
        # Streams in flight may or may not have been processed.
        self._fail_all(H2Error("connection lost", retryable=True))
        self.pool.forget(self)

    # -- frames in ------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is not None and kind != http2.CONTINUATION:
            raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == http2.HEADERS:
            if stream_id == 0:
                raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "HEADERS on stream 0")
            if flags & (http2.PADDED | http2.PRIORITY_FLAG):
                payload = http2.strip_padding(flags, payload, priority=True)
            if flags & http2.END_HEADERS:
                self._headers(stream_id, flags, payload)
            else:
                self.continuation = (stream_id, flags, [payload])
        elif kind == http2.DATA:
            self._data(flags, stream_id, payload)
        elif kind == http2.CONTINUATION:
            if self.continuation is None or self.continuation[0] != stream_id:
                raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "stray CONTINUATION")
            self.continuation[2].append(payload)
            if flags & http2.END_HEADERS:
                _, first_flags, fragments = self.continuation
                self.continuation = None
                self._headers(stream_id, first_flags, b"".join(fragments))
        elif kind == http2.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == http2.SETTINGS:
            if not flags & http2.ACK:
                self._settings(http2.parse_settings(payload))
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
        if stream.body is not None:
            stream.body += http2.strip_padding(flags, payload) if flags & http2.PADDED else payload
        elif flags & http2.PADDED:
            http2.strip_padding(flags, payload)  # still a protocol error when malformed
        if flags & http2.END_STREAM:
            self._finish(stream_id, stream)
            return
        stream.unacked += size
        if stream.unacked >= STREAM_WINDOW // 2:
            self.out.append(http2.window_update(stream_id, stream.unacked))
            stream.unacked = 0

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.status == 0 and not stream.batch.keep_bodies:
            # Nearly every answer: a 2xx of which only the status is kept.
            status = self.decoder.status(block)
            if 200 <= status < 300:
                stream.status = status
                if flags & http2.END_STREAM:
                    self._finish(stream_id, stream)
                return
        # Decoded even for streams we no longer track: the table must stay in step.
        fields = self.decoder.decode(block)
        if stream is None:
            return
        if stream.status == 0:  # not trailers
            # Pseudo-headers come first (RFC 9113 8.3), so :status is the first field.
            if fields and fields[0][0] == b":status":
                stream.status = _status(fields[0][1])
            keep = stream.batch.keep_bodies or not 200 <= stream.status < 300
            if 100 <= stream.status < 200:
                stream.status = 0  # informational: the real answer follows
            elif keep:
                stream.body = bytearray()
                stream.headers = {}
        headers = stream.headers
        if headers is not None:
            for name, value in fields:
                if name[0] != 58:  # pseudo-headers start with ":"
                    headers[name.decode("latin-1")] = value.decode("latin-1")
        if flags & http2.END_STREAM:
            self._finish(stream_id, stream)

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
        self.released = True

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise http2.ConnectionError_(http2.FRAME_SIZE_ERROR, "WINDOW_UPDATE size")
        increment = http2.u32(payload) & http2.MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise http2.ConnectionError_(http2.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.send_window += increment
            if self.send_window > http2.MAX_WINDOW:
                raise http2.ConnectionError_(http2.FLOW_CONTROL_ERROR, "window past 2^31-1")
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.window += increment
            if stream.window > http2.MAX_WINDOW:  # RFC 9113 6.9.1: a stream error
                self.out.append(http2.rst_stream(stream_id, http2.FLOW_CONTROL_ERROR))
                self._fail(stream_id, H2Error("FLOW_CONTROL_ERROR", retryable=True))
                return
        if self.blocked:
            self._send_blocked()

    def _protocol_error(self, code: int, reason: str) -> None:
        self.out.append(http2.goaway(0, code, reason.encode()[:200]))
        self.usable = False
        self._fail_all(H2Error(f"protocol error: {reason}", retryable=True))
        self.flush()
        self.close()

    # -- requests -------------------------------------------------------------------------

    def _blocks(self, batch: Batch) -> tuple[bytes, bytes]:
        """The request header block of ``batch`` around its per-request path (and
        content-length, added by the caller), made anew: :meth:`start` reuses the last
        one while the batch and the encoder's generation are the same."""
        encoder = self.encoder
        fields = [(":method", batch.method), (":scheme", "https")]
        fields.append((":authority", batch.authority))
        fields.append((":path", batch.shared_path or _MARK))
        fields += batch.headers
        before = encoder.generation
        block = encoder.block(fields, () if batch.shared_path is not None else _UNIQUE_PATH)
        if batch.shared_path is None:
            head, _, tail = block.partition(_MARK_FIELD)
        else:
            head, tail = block, b""
        # A block that added entries to the server's table is for this request only.
        self._block_of = batch if encoder.generation == before else None
        self._block_generation = before
        self._head, self._tail = head, tail
        return head, tail

    def start(self, batch: Batch, limit: int) -> int:
        """Start up to ``limit`` of ``batch``'s waiting requests (the pool checked
        :attr:`free_streams`); returns how many, fewer when the batch ran out."""
        out, streams = self.out, self.streams
        shared_path, bodies = batch.shared_path, batch.bodies
        max_frame_size, window = self.max_frame_size, self.initial_window
        started = 0
        while started < limit:
            i = batch.take()
            if i < 0:
                break
            started += 1
            stream_id = self.next_stream_id
            self.next_stream_id = stream_id + 2
            if stream_id + 2 > http2.MAX_STREAM_ID:
                self.usable = False  # ids exhausted: later requests go to a new connection
                limit = started
            if batch is self._block_of and self.encoder.generation == self._block_generation:
                head, tail = self._head, self._tail
            else:
                head, tail = self._blocks(batch)
            body = bodies if isinstance(bodies, bytes) else bodies[i]
            if shared_path is None:
                block = b"".join((head, _path_field(batch.paths[i].encode()), tail))
            else:
                block = head
            size = len(body)
            if size:
                block += batch.length_field or _length_field(size)
                flags = _END_HEADERS
            else:
                flags = _END_HEADERS_AND_STREAM
            stream = _Stream(batch, i, window)
            streams[stream_id] = stream
            length = len(block)
            if length <= max_frame_size:
                out += (
                    _pack_header(length >> 16, length & 0xFFFF, _HEADERS, flags, stream_id),
                    block,
                )
            else:
                out += http2.header_frames(
                    stream_id, block, end_stream=not size, max_frame_size=max_frame_size
                )
            if not size:
                continue
            if size <= self.send_window and size <= window and size <= max_frame_size:
                head = _pack_header(size >> 16, size & 0xFFFF, _DATA, _END_STREAM, stream_id)
                out += (head, body)
                self.send_window -= size
                stream.window -= size
            else:
                stream.unsent = memoryview(body)
                self._send_body(stream_id, stream)
        if started and not self.dirty:
            self.dirty = True
            self.loop.call_soon(self.flush)
        return started

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

    def _finish(self, stream_id: int, stream: _Stream) -> None:
        if stream.status == 0:  # ended without a final status: a malformed response
            self.out.append(http2.rst_stream(stream_id, http2.PROTOCOL_ERROR))
            self._fail(stream_id, H2Error("malformed response", retryable=True))
            return
        del self.streams[stream_id]
        if self.blocked:
            self.blocked.pop(stream_id, None)
        self.traffic.answered(self.now - stream.batch.started, stream.status)
        if stream.body is None:
            stream.batch.answered(stream.index, stream.status, {}, b"")
        else:
            stream.batch.answered(
                stream.index, stream.status, stream.headers or {}, bytes(stream.body)
            )
        self.released = True

    def _fail(self, stream_id: int, error: H2Error) -> None:
        stream = self.streams.pop(stream_id, None)
        self.blocked.pop(stream_id, None)
        if stream is None:
            return
        self.released = True
        self.pool.failed(stream.batch, stream.index, error)

    def _fail_all(self, error: H2Error) -> None:
        for stream_id in list(self.streams):
            self._fail(stream_id, error)

    def _goaway(self, last_stream_id: int) -> None:
        self.usable = False
        for stream_id in [s for s in self.streams if s > last_stream_id]:
            self._fail(stream_id, H2Error("GOAWAY", retryable=True, unprocessed=True))
        if not self.streams:
            self.close()
        self.released = True

    def expire(self, now: float) -> None:
        """Reset and fail the streams whose deadline has passed."""
        expired = [s for s, stream in self.streams.items() if stream.batch.deadline <= now]
        for stream_id in expired:
            self.out.append(http2.rst_stream(stream_id, http2.CANCEL))
            self._fail(stream_id, H2Error("TIMEOUT", retryable=True))
        self.flush()
        if not self.usable and not self.streams:
            self.close()

    # -- output ---------------------------------------------------------------------------

    def flush(self) -> None:
        self.dirty = False
        if self.out:
            out, self.out = self.out, []
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(out))

    def close(self) -> None:
        self.usable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
