"""The emulators' default HTTP/2: frame by frame on :mod:`pushfan.http2` (RFC 9113).

A request costs tens of microseconds here against hundreds on the ``h2`` state machine
(:mod:`.server_h2`), so one core serves well over 10,000 requests a second. Per
connection, :class:`FramesEngine`:

- checks the client preface (magic, then SETTINGS first), sends our SETTINGS
  (MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE from ``ServerOptions``)
  and opens the connection window as wide as a stream's; ACKs the client's SETTINGS and
  applies its INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE; answers PING;
- reads HEADERS (+ CONTINUATION) and DATA, padding and priority fields stripped; every
  header block goes through the connection's one decoder, even for a stream it refuses,
  so the HPACK table stays in sync; received DATA is credited back with WINDOW_UPDATEs,
  batched (the connection's once half its window is used, a stream's once per read);
- refuses streams beyond MAX_CONCURRENT_STREAMS, and after a ``goaway_after`` GOAWAY those
  above its last stream id, with RST_STREAM REFUSED_STREAM: the handler never sees them;
- answers a client's RST_STREAM by dropping the stream and what it had left to send, its
  WINDOW_UPDATE by sending blocked DATA, its GOAWAY by closing once this read's output is
  written;
- answers protocol errors with GOAWAY and the RFC's error code, then closes; a malformed
  request (header rules of RFC 9113 8.2-8.3) gets RST_STREAM PROTOCOL_ERROR.

PRIORITY frames and unknown frame types are ignored. Answering is :class:`.Streams`'s.
Everything one read produces goes out in one ``transport.write``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpack.exceptions import HPACKError

from pushfan import http2
from pushfan.emulators.server_headers import RequestDecoder, request_headers
from pushfan.emulators.server_streams import Stream, Streams
from pushfan.http2 import DATA, HEADERS, PROTOCOL_ERROR, ConnectionError_, HeaderDecoder

if TYPE_CHECKING:
    from pushfan.emulators.server import ServerConnection

MAX_HEADER_BLOCK = 1 << 18  # compressed bytes across HEADERS + CONTINUATION
_SETTINGS_ACK = http2.frame(http2.SETTINGS, http2.ACK, 0)


class FramesEngine(Streams):
    """HTTP/2 for one connection, frame by frame."""

    def __init__(self, conn: ServerConnection) -> None:
        super().__init__(conn)
        self.reader = http2.FrameReader(self.options.max_frame_size)
        self.decoder = HeaderDecoder(RequestDecoder(), cache_size=64)
        self.preface: bytes | None = b""  # the magic's start until all of it is here
        self.settings_seen = False  # the client's first SETTINGS (ends its preface)
        self.last_stream_id = 0
        self.block_stream = 0  # stream whose header block awaits CONTINUATION frames
        self.block_flags = 0
        self.block = bytearray()
        self.recv_open = max(http2.DEFAULT_WINDOW, self.options.initial_window_size)
        self.recv_window = self.recv_open  # ours, for the connection
        self.stream_recv = self.recv_open  # a new stream's, until our SETTINGS are ACKed
        self.consumed = 0  # received on the connection, not credited back yet

    def start(self) -> None:
        options = self.options
        settings = {
            http2.MAX_CONCURRENT_STREAMS: options.max_concurrent_streams,
            http2.INITIAL_WINDOW_SIZE: options.initial_window_size,
            http2.MAX_FRAME_SIZE: options.max_frame_size,
        }
        self.out.append(http2.settings_frame(settings))
        if self.recv_open > http2.DEFAULT_WINDOW:
            self.out.append(http2.window_update(0, self.recv_open - http2.DEFAULT_WINDOW))
        self.flush()

    def lost(self) -> None:
        self.drop_all()

    def received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            if not self.settings_seen:
                data = self._preface(data)
            for kind, flags, stream_id, payload in self.reader.feed(data):
                if self.block_stream and kind != http2.CONTINUATION:
                    raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION expected")
                if kind == DATA and self.settings_seen:
                    self._data(flags, stream_id, payload)
                elif kind == HEADERS and self.settings_seen:
                    self._headers(flags, stream_id, payload)
                elif kind == http2.SETTINGS:
                    self._settings(flags, stream_id, payload)
                elif not self.settings_seen:
                    raise ConnectionError_(PROTOCOL_ERROR, "the preface must end with SETTINGS")
                elif kind == http2.WINDOW_UPDATE:
                    self._window_update(stream_id, payload)
                elif kind == http2.CONTINUATION:
                    self._continuation(flags, stream_id, payload)
                elif kind == http2.RST_STREAM:
                    self._reset(stream_id, payload)
                elif self._control(kind, flags, stream_id, payload):
                    break
        except ConnectionError_ as exc:
            self.out.append(http2.goaway(self.last_stream_id, exc.code, str(exc).encode()))
            self.drop_all()
        self._read_done()

    def _read_done(self) -> None:
        """Credit received DATA back, write this read's output, close if it is over."""
        if self.closed:
            self.flush()
            self.conn.close()
            return
        if self.consumed * 2 >= self.recv_open:
            self.out.append(http2.window_update(0, self.consumed))
            self.recv_window += self.consumed
            self.consumed = 0
        if self.credit:
            for stream_id, size in self.credit.items():
                stream = self.streams.get(stream_id)
                if stream is not None and not stream.ended:
                    self.out.append(http2.window_update(stream_id, size))
                    stream.recv_window += size
            self.credit.clear()
        self.flush()

    def _preface(self, data: bytes) -> bytes:
        """``data`` past the client preface's magic, once all of the magic is here."""
        if self.preface is None:
            return data
        got = self.preface + data
        if got.startswith(http2.PREFACE):
            self.preface = None
            return got[len(http2.PREFACE) :]
        if http2.PREFACE.startswith(got):
            self.preface = got
            return b""
        raise ConnectionError_(PROTOCOL_ERROR, "no HTTP/2 client preface")

    # -- frames ---------------------------------------------------------------------------

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # padding counts too
        self.recv_window -= size
        if self.recv_window < 0:
            raise ConnectionError_(http2.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.consumed += size
        stream = self.streams.get(stream_id)
        if stream is None:  # closed or refused: ignored, but it used the connection window
            if stream_id > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "DATA on an idle stream")
            return
        if stream.ended:
            self.drop(stream, http2.STREAM_CLOSED)
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            raise ConnectionError_(http2.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        body = http2.strip_padding(flags, payload) if flags & http2.PADDED else payload
        if body:
            stream.body.append(body)
        if flags & http2.END_STREAM:
            stream.ended = True
            self.request_done(stream)
        elif size:
            self.credit[stream_id] = self.credit.get(stream_id, 0) + size

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & (http2.PADDED | http2.PRIORITY_FLAG):
            payload = http2.strip_padding(flags, payload, priority=True)
        if flags & http2.END_HEADERS:
            self._header_block(flags, stream_id, payload)
        else:
            self.block_stream, self.block_flags, self.block = stream_id, flags, bytearray(payload)

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id or stream_id != self.block_stream:
            raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION out of sequence")
        self.block += payload
        if len(self.block) > MAX_HEADER_BLOCK:
            raise ConnectionError_(http2.ENHANCE_YOUR_CALM, "header block too large")
        if flags & http2.END_HEADERS:
            self.block_stream = 0
            self._header_block(self.block_flags, stream_id, bytes(self.block))
            self.block = bytearray()

    def _header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        try:  # decoded whatever becomes of the stream: the table must stay in sync
            fields = self.decoder.decode(block)
        except HPACKError as exc:
            raise ConnectionError_(http2.COMPRESSION_ERROR, f"header block: {exc}") from None
        ended = bool(flags & http2.END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers: they end the request, their fields are ignored
            if stream.ended or not ended:
                self.drop(stream, http2.STREAM_CLOSED if stream.ended else PROTOCOL_ERROR)
            else:
                stream.ended = True
                self.request_done(stream)
            return
        if stream_id <= self.last_stream_id or not stream_id & 1:
            if stream_id in self.reset_early:
                return  # we reset it, the client had sent this already (RFC 9113 5.1)
            raise ConnectionError_(PROTOCOL_ERROR, f"stream id {stream_id} cannot open")
        self.last_stream_id = stream_id
        if self.going_away or len(self.streams) >= self.options.max_concurrent_streams:
            self.refuse(stream_id, http2.REFUSED_STREAM, ended=ended)
            return
        headers = request_headers(fields)
        if headers is None:
            self.refuse(stream_id, PROTOCOL_ERROR, ended=ended)
            return
        stream = Stream(stream_id, headers, self.peer_window, self.stream_recv)
        self.streams[stream_id] = stream
        if ended:
            stream.ended = True
            self.request_done(stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(http2.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        increment = http2.u32(payload) & http2.MAX_WINDOW
        if not stream_id:
            if not increment:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > http2.MAX_WINDOW:
                raise ConnectionError_(http2.FLOW_CONTROL_ERROR, "connection window > 2^31-1")
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                if stream_id > self.last_stream_id:
                    raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
                return
            stream.send += increment
            if not increment or stream.send > http2.MAX_WINDOW:
                self.drop(stream, http2.FLOW_CONTROL_ERROR if increment else PROTOCOL_ERROR)
                return
        if self.blocked:
            self.send_pending()

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & http2.ACK:
            if payload:
                raise ConnectionError_(http2.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self.stream_recv = self.options.initial_window_size
            return
        self.settings_seen = True
        values = http2.parse_settings(payload)
        window = values.get(http2.INITIAL_WINDOW_SIZE, self.peer_window)
        if window != self.peer_window:
            delta, self.peer_window = window - self.peer_window, window
            for stream in self.streams.values():
                stream.send += delta
                if stream.send > http2.MAX_WINDOW:
                    raise ConnectionError_(http2.FLOW_CONTROL_ERROR, "stream window > 2^31-1")
        self.peer_frame = values.get(http2.MAX_FRAME_SIZE, self.peer_frame)
        self.out.append(_SETTINGS_ACK)
        if self.blocked:
            self.send_pending()

    def _reset(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(http2.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
        if not stream_id or stream_id > self.last_stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0 or an idle stream")
        stream = self.streams.get(stream_id)
        if stream is not None:
            self.drop(stream, None)

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> bool:
        """PING, GOAWAY, PRIORITY, PUSH_PROMISE and unknown frames; True: stop reading."""
        if kind in (http2.PING, http2.GOAWAY):
            if stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "PING or GOAWAY on a stream")
            if len(payload) != 8 if kind == http2.PING else len(payload) < 8:
                raise ConnectionError_(http2.FRAME_SIZE_ERROR, "PING or GOAWAY of a bad length")
            if kind == http2.GOAWAY:
                self.closed = True  # the client leaves: answer what is here, then close
                return True
            if not flags & http2.ACK:
                self.out.append(http2.frame(http2.PING, http2.ACK, 0, payload))
        elif kind == http2.PRIORITY:  # deprecated (RFC 9113 5.3.2): checked, then ignored
            if not stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise ConnectionError_(http2.FRAME_SIZE_ERROR, "PRIORITY must be 5 bytes")
        elif kind == http2.PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "clients must not push")
        return False
