"""The streams of one frames-engine connection: requests to the handler, responses out.

:class:`Streams` is the half of :class:`~.server_frames.FramesEngine` that holds the open
streams and answers them: a finished request goes to the handler synchronously; its
response is written at once or on one timer (``Response.delay``), its DATA within the
client's connection and stream windows and its MAX_FRAME_SIZE. DATA that does not fit
waits in ``blocked`` until a WINDOW_UPDATE or SETTINGS opens a window. A stream leaves
``streams`` (and stops counting against MAX_CONCURRENT_STREAMS) once its response is sent
or it is reset. Output is collected in ``out`` and written by :meth:`Streams.flush`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pushfan.emulators.server_headers import response_block
from pushfan.http2 import (
    DATA,
    DEFAULT_FRAME_SIZE,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    data_frames,
    frame,
    goaway,
    header_frames,
    rst_stream,
)

if TYPE_CHECKING:
    from pushfan.emulators.server import Response, ServerConnection

_RESET_MEMORY = 1024  # streams reset before the client ended them, remembered


class Stream:
    """One request stream, from its HEADERS until its response is sent."""

    __slots__ = ("body", "ended", "headers", "id", "pending", "recv_window", "send", "timer")

    def __init__(self, stream_id: int, headers: dict[str, str], send: int, recv: int) -> None:
        self.id = stream_id
        self.headers = headers
        self.body: list[bytes] = []
        self.ended = False  # the client sent END_STREAM
        self.send = send  # the client's window for our DATA
        self.recv_window = recv  # ours for its DATA
        self.pending = memoryview(b"")  # response body not sent yet
        self.timer: asyncio.TimerHandle | None = None


class Streams:
    """Open streams and the responses to them, for one connection."""

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.options = conn.options
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}  # streams whose DATA waits for a window
        self.credit: dict[int, int] = {}  # stream -> received bytes not credited back yet
        self.reset_early: set[int] = set()  # reset before the client ended them
        self.out: list[bytes] = []
        self.send_window = DEFAULT_WINDOW  # the client's connection window
        self.peer_window = DEFAULT_WINDOW  # the client's INITIAL_WINDOW_SIZE
        self.peer_frame = DEFAULT_FRAME_SIZE  # the client's MAX_FRAME_SIZE
        self.served = 0
        self.going_away = False
        self.goaway_last_stream = 0
        self.closed = False

    def refuse(self, stream_id: int, code: int, *, ended: bool) -> None:
        """RST_STREAM ``code`` a stream not (or no longer) in ``streams``."""
        self.out.append(rst_stream(stream_id, code))
        if not ended:  # the client may still send on it: those frames are ignored
            if len(self.reset_early) >= _RESET_MEMORY:
                self.reset_early.clear()
            self.reset_early.add(stream_id)

    def drop(self, stream: Stream, code: int | None) -> None:
        """Forget ``stream`` and what it had left to send; RST_STREAM ``code`` if given."""
        del self.streams[stream.id]
        self.blocked.pop(stream.id, None)
        self.credit.pop(stream.id, None)
        if stream.timer is not None:
            stream.timer.cancel()
        if code is not None:
            self.refuse(stream.id, code, ended=stream.ended)

    def drop_all(self) -> None:
        self.closed = True
        for stream in self.streams.values():
            if stream.timer is not None:
                stream.timer.cancel()
        self.streams.clear()
        self.blocked.clear()

    def request_done(self, stream: Stream) -> None:
        """The client ended ``stream``: answer it (or refuse it after our GOAWAY)."""
        stream_id = stream.id
        if self.going_away and stream_id > self.goaway_last_stream:
            # GOAWAY promised the client these were never processed; keep the promise.
            self.drop(stream, REFUSED_STREAM)
            return
        body = stream.body[0] if len(stream.body) == 1 else b"".join(stream.body)
        length = stream.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) != len(body)):
            self.drop(stream, PROTOCOL_ERROR)  # malformed (RFC 9113 8.1.1)
            return
        response = self.conn.request(stream.headers, body)
        self.served += 1
        if response.delay > 0:
            stream.timer = asyncio.get_running_loop().call_later(
                response.delay, self._respond_later, stream, response
            )
        else:
            self.respond(stream, response)
        limit = self.options.goaway_after
        if limit is not None and self.served >= limit and not self.going_away:
            self.going_away = True
            self.goaway_last_stream = stream_id
            self.out.append(goaway(stream_id, NO_ERROR))

    def _respond_later(self, stream: Stream, response: Response) -> None:
        stream.timer = None
        if not self.closed and self.streams.get(stream.id) is stream:
            self.respond(stream, response)
            self.flush()

    def respond(self, stream: Stream, response: Response) -> None:
        stream_id, body, out = stream.id, response.body, self.out
        block = response_block(response.status, response.headers, len(body))
        if len(block) <= self.peer_frame:
            flags = END_HEADERS if body else END_HEADERS | END_STREAM
            out.append(frame(HEADERS, flags, stream_id, block))
        else:
            frames = header_frames(
                stream_id, block, end_stream=not body, max_frame_size=self.peer_frame
            )
            out.extend(frames)
        size = len(body)
        if not size:
            del self.streams[stream_id]
        elif size <= self.send_window and size <= stream.send and size <= self.peer_frame:
            out.append(frame(DATA, END_STREAM, stream_id, body))
            self.send_window -= size
            del self.streams[stream_id]
        else:
            stream.pending = memoryview(body)
            self.blocked[stream_id] = stream
            self.send_pending()

    def send_pending(self) -> None:
        """Send blocked DATA as far as the client's windows allow, oldest stream first."""
        out = self.out
        for stream_id, stream in list(self.blocked.items()):
            window = min(self.send_window, stream.send)
            frames, view = data_frames(stream_id, stream.pending, window, self.peer_frame)
            out += frames
            sent = len(stream.pending) - len(view)
            self.send_window -= sent
            stream.send -= sent
            stream.pending = view
            if not view:
                del self.blocked[stream_id]
                del self.streams[stream_id]
            if self.send_window <= 0:
                return

    def flush(self) -> None:
        """Write everything collected in ``out`` in one ``transport.write``."""
        transport = self.conn.transport
        if self.out and transport is not None:
            transport.write(b"".join(self.out))
        self.out.clear()
