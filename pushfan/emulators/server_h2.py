"""The emulators' HTTP/2 on the ``h2`` state machine (``ServerOptions(engine="h2")``).

``h2`` is a real implementation not written here: tests that check pushfan's own HTTP/2
client use this engine so the client is not judged only by code sharing its codec
(:mod:`pushfan.http2`) with the default engine, :mod:`.server_frames`. It costs ~250 us a
request (about 4,000 a second on one core). The engines agree on settings, flow control,
delays, resets and ``goaway_after``'s GOAWAY, except where ``h2`` decides: a stream beyond
MAX_CONCURRENT_STREAMS is a connection error (GOAWAY PROTOCOL_ERROR, not RST_STREAM
REFUSED_STREAM), and after our GOAWAY ``h2`` sends nothing more: streams above its last
stream id go unanswered rather than refused (the GOAWAY says they were not processed), and
so does a delayed or flow-blocked response to a stream at or below it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

if TYPE_CHECKING:
    from pushfan.emulators.server import Response, ServerConnection


class H2Engine:
    """HTTP/2 for one connection, on ``h2``."""

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.options = conn.options
        self.h2: h2.connection.H2Connection | None = None
        self.streams: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        self.pending: dict[int, tuple[memoryview, bool]] = {}  # stream -> unsent body
        self.served = 0
        self.going_away = False
        self.goaway_last_stream = 0

    def start(self) -> None:
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

    def lost(self) -> None:
        self.pending.clear()

    def received(self, data: bytes) -> None:
        conn = self.h2
        assert conn is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.conn.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = (list(event.headers or []), bytearray())
                if event.stream_ended is not None:
                    self._request_done(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and event.data:
                    stream[1].extend(event.data)
                if event.flow_controlled_length:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_ended is not None:
                    self._request_done(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._request_done(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
                self.pending.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._send_pending()  # a window grew (SETTINGS may raise INITIAL_WINDOW_SIZE)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._flush()
                self.conn.close()
                return
        self._flush()

    def _request_done(self, stream_id: int) -> None:
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
        response = self.conn.request(headers, bytes(body))
        self.served += 1
        if response.delay > 0:
            asyncio.get_running_loop().call_later(
                response.delay, self._respond_later, stream_id, response
            )
        else:
            self._respond(stream_id, response)
        limit = self.options.goaway_after
        if limit is not None and self.served >= limit and not self.going_away:
            self.going_away = True
            self.goaway_last_stream = stream_id
            assert self.h2 is not None
            self.h2.close_connection(last_stream_id=stream_id)

    def _respond_later(self, stream_id: int, response: Response) -> None:
        if self.conn.transport is None or self.h2 is None:
            return
        self._respond(stream_id, response)
        self._flush()

    def _respond(self, stream_id: int, response: Response) -> None:
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
            self._send_pending()

    def _send_pending(self) -> None:
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

    def _flush(self) -> None:
        transport = self.conn.transport
        if self.h2 is not None and transport is not None:
            out = self.h2.data_to_send()
            if out:
                transport.write(out)
