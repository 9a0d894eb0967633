"""HTTP/2 on the wire (RFC 9113, RFC 7541): frames and header blocks, nothing more.

Shared by the senders' connection pool and the emulators' server. They work on frames
directly because a general state machine (``h2``) costs ~150 us a request on each side,
which caps a core at a few thousand requests a second; this codec costs a few us.

What is here:

- :func:`frame` builds one frame; :class:`FrameReader` cuts received bytes into frames
  and rejects a frame longer than the size we advertised.
- :class:`HeaderEncoder` writes header blocks with literal fields without indexing
  (plus exact static-table matches), so a block depends on nothing but its fields and
  can be cached and concatenated; the peer's dynamic table is never touched.
- :class:`HeaderDecoder` decodes with ``hpack`` (peers do index and Huffman-code their
  headers) and remembers blocks whose decoding left the dynamic table as it was: a
  server answering the same way again sends the same bytes, decoded once.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterator, Sequence

import hpack
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9

# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}

DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384
MAX_WINDOW = (1 << 31) - 1
MAX_STREAM_ID = (1 << 31) - 1

_HEADER = struct.Struct(">BHBBL")  # length as 1+2 bytes, type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")


class ConnectionError_(Exception):
    """The peer broke the protocol: answer with GOAWAY ``code`` and close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: the 9-byte header followed by ``payload``."""
    size = len(payload)
    return _HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code) + debug)


def parse_settings(payload: bytes) -> dict[int, int]:
    if len(payload) % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    values = dict(_SETTING.iter_unpack(payload))
    if values.get(ENABLE_PUSH, 0) > 1:
        raise ConnectionError_(PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
    if values.get(INITIAL_WINDOW_SIZE, 0) > MAX_WINDOW:
        raise ConnectionError_(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
    size = values.get(MAX_FRAME_SIZE, DEFAULT_FRAME_SIZE)
    if not DEFAULT_FRAME_SIZE <= size <= (1 << 24) - 1:
        raise ConnectionError_(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
    return values


def u32(payload: bytes, offset: int = 0) -> int:
    value: int = _U32.unpack_from(payload, offset)[0]
    return value


def strip_padding(flags: int, payload: bytes, *, priority: bool = False) -> bytes:
    """A DATA or HEADERS payload without its padding (and priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise ConnectionError_(PROTOCOL_ERROR, "PADDED frame without a pad length")
        start, end = 1, end - payload[0]
    if priority and flags & PRIORITY_FLAG:
        start += 5
    if end < start:
        raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[start:end]


class FrameReader:
    """Cuts a byte stream into ``(type, flags, stream_id, payload)`` frames."""

    def __init__(self, max_frame_size: int = DEFAULT_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
        buf = self._buffer
        buf += data
        offset, end = 0, len(buf)
        try:
            while end - offset >= 9:
                high, low, kind, flags, stream_id = _HEADER.unpack_from(buf, offset)
                size = (high << 16) | low
                if size > self.max_frame_size:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"a {size}-byte frame")
                if end - offset - 9 < size:
                    break
                payload = bytes(buf[offset + 9 : offset + 9 + size])
                offset += 9 + size
                yield kind, flags, stream_id & MAX_STREAM_ID, payload
        finally:
            del buf[:offset]


_STATIC_EXACT: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_EXACT.setdefault((_name, _value), _index)
    _STATIC_NAME.setdefault(_name, _index)
_STATIC_EXACT_STR = {(n.decode(), v.decode()) for n, v in _STATIC_EXACT}


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(name: bytes, value: bytes) -> bytes:
    """One header field that leaves every dynamic table as it was."""
    exact = _STATIC_EXACT.get((name, value))
    if exact is not None:
        return _integer(exact, 7, 0x80)
    index = _STATIC_NAME.get(name)
    head = _integer(index, 4, 0x00) if index else b"\x00" + _integer(len(name), 7, 0) + name
    return head + _integer(len(value), 7, 0) + value


class HeaderEncoder:
    """Encoded fields, with a bounded cache of the short ones (long values, such as a
    JWT echoed back, would make the cache large for little gain).

    Names must already be lower-case (HTTP/2 requires it); nothing is validated here.
    """

    def __init__(self, cache_size: int = 4096, longest: int = 128) -> None:
        self._cache: dict[tuple[str, str], bytes] = {}
        self._cache_size = cache_size
        self._longest = longest

    def field(self, name: str, value: str) -> bytes:
        key = (name, value)
        encoded = self._cache.get(key)
        if encoded is None:
            encoded = encode_field(name.encode("latin-1"), value.encode("latin-1"))
            if len(value) <= self._longest:
                if len(self._cache) >= self._cache_size:
                    self._cache.clear()
                self._cache[key] = encoded
        return encoded


class IndexingEncoder:
    """Header blocks for one connection that index repeated fields in the peer's table.

    Fields passed as ``indexed`` are added to the peer's dynamic table the first time
    (literal with incremental indexing) and referred to by index afterwards, so a server
    decodes one byte instead of a string for each of them; the rest are literals
    without indexing from the shared :class:`HeaderEncoder`. Entries are never evicted behind
    our back: when the next block's new fields would not fit, the block starts by
    emptying the table (size updates to 0 and back). Blocks must reach the peer in the
    order they were made.

    ``generation`` changes whenever a block changed the peer's table (or owed it a size
    update): a block made for the same fields in the same generation has the same bytes,
    so callers may reuse it until the generation moves.
    """

    def __init__(self, literals: HeaderEncoder, table_size: int = 4096) -> None:
        self.generation = 0
        self.literals = literals
        self.max_size = 4096  # every HPACK table starts so (RFC 9113 6.5.2)
        self._size = 0
        self._count = 0
        self._entries: dict[tuple[str, str], int] = {}  # field -> insertion number
        self._prefix = b""  # size updates owed at the start of the next block
        self.set_table_size(table_size)

    def set_table_size(self, size: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE (we use at most 4096 of it)."""
        size = min(size, 4096)
        if size != self.max_size:
            self.max_size = size
            self._reset()

    def _reset(self) -> None:
        self._entries.clear()
        self._size = self._count = 0
        self._prefix = _integer(0, 5, 0x20) + _integer(self.max_size, 5, 0x20)

    def block(self, fields: Sequence[tuple[str, str]], unique: Collection[str] = ()) -> bytes:
        """A block of ``fields`` in order; those named in ``unique`` (values that never
        repeat, such as an APNs ``:path``) are literals without indexing."""
        entries = self._entries
        new = {f for f in fields if f[0] not in unique and f not in entries}
        new -= _STATIC_EXACT_STR
        if new and self._size + sum(len(n) + len(v) + 32 for n, v in new) > self.max_size:
            self._reset()
        if self._prefix:
            parts = [self._prefix]
            self._prefix = b""
            self.generation += 1
        else:
            parts = []
        for name, value in fields:
            if name in unique:  # never repeats: not worth a cache entry either
                parts.append(encode_field(name.encode("latin-1"), value.encode("latin-1")))
                continue
            number = entries.get((name, value))
            if number is not None:
                parts.append(_integer(61 + self._count - number, 7, 0x80))
                continue
            size = len(name) + len(value) + 32
            if (name, value) in _STATIC_EXACT_STR or self._size + size > self.max_size:
                parts.append(self.literals.field(name, value))
                continue
            raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
            index = _STATIC_NAME.get(raw_name)
            head = _integer(index, 6, 0x40) if index else b"\x40" + _integer(len(raw_name), 7, 0)
            if not index:
                head += raw_name
            parts.append(head + _integer(len(raw_value), 7, 0) + raw_value)
            entries[name, value] = self._count
            self._count += 1
            self._size += size
            self.generation += 1
        return b"".join(parts)


def path_field(path: bytes) -> bytes:
    """``:path`` as a literal without indexing, with the static table's name (a path that
    never repeats, such as APNs' ``/3/device/<token>``): what :func:`encode_field` gives,
    without its lookups."""
    size = len(path)
    if size < 127:
        return b"\x04" + bytes((size,)) + path
    return b"\x04" + _integer(size, 7, 0) + path


def data_frames(
    stream_id: int, body: memoryview, window: int, max_frame_size: int
) -> tuple[list[bytes], memoryview]:
    """DATA frames for as much of ``body`` as ``window`` (the smaller of the connection's
    and the stream's send credit) allows, END_STREAM on the body's last byte; and the
    rest, which must wait for a WINDOW_UPDATE."""
    frames = []
    while body and window > 0:
        size = min(window, max_frame_size, len(body))
        end = END_STREAM if size == len(body) else 0
        frames.append(frame(DATA, end, stream_id, bytes(body[:size])))
        body = body[size:]
        window -= size
    return frames, body


def header_frames(
    stream_id: int, block: bytes, *, end_stream: bool, max_frame_size: int
) -> list[bytes]:
    """HEADERS (and CONTINUATION frames when the block is larger than a frame)."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame_size:
        return [frame(HEADERS, flags | END_HEADERS, stream_id, block)]
    chunks = [block[i : i + max_frame_size] for i in range(0, len(block), max_frame_size)]
    frames = [frame(HEADERS, flags, stream_id, chunks[0])]
    for i, chunk in enumerate(chunks[1:], start=2):
        last = END_HEADERS if i == len(chunks) else 0
        frames.append(frame(CONTINUATION, last, stream_id, chunk))
    return frames


# indexed static fields (RFC 7541 appendix A, entries 8-14) by their one-byte encoding
_STATIC_STATUS = {0x80 | i: int(HeaderTable.STATIC_TABLE[i - 1][1]) for i in range(8, 15)}


def _skip_integer(block: bytes, offset: int, mask: int) -> int:
    """Past an HPACK integer whose prefix is ``mask`` in ``block[offset]``."""
    if block[offset] & mask != mask:
        return offset + 1
    offset += 1
    while block[offset] & 0x80:
        offset += 1
    return offset + 1


def _skip_string(block: bytes, offset: int) -> int:
    """Past an HPACK string literal (Huffman-coded or not) starting at ``offset``."""
    first = block[offset]
    size = first & 0x7F
    offset += 1
    if size == 0x7F:
        size, shift = 0x7F, 0
        while True:
            byte = block[offset]
            offset += 1
            size += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return offset + size


class HeaderDecoder:
    """An ``hpack.Decoder`` plus a cache of blocks that did not change the dynamic table.

    A cached block means the same fields only while the table is unchanged, so any
    block that changes the table (an entry added, a size update) empties the cache;
    peers resending the same headers send the same bytes and are decoded once. The
    returned lists are shared: callers must not modify them. Every block must be passed
    here, in order, including those of streams the caller no longer tracks, or the
    table falls out of step.
    """

    def __init__(
        self,
        decoder: hpack.Decoder | None = None,
        *,
        cache_size: int = 256,
        longest: int = 1024,
    ) -> None:
        self.decoder = decoder if decoder is not None else hpack.Decoder()
        self._cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._statuses: dict[bytes, int] = {}
        self._cache_size = cache_size
        self._longest = longest  # longer blocks are not worth remembering

    def _table_state(self) -> tuple[int, object]:
        # An entry added is a new tuple at the front; eviction only follows an add or
        # a size update, so (size limit, front entry) changes whenever the table does.
        table = self.decoder.header_table
        entries = table.dynamic_entries
        return table.maxsize, entries[0] if entries else None

    def status(self, block: bytes) -> int:
        """The block's ``:status`` without decoding it, where that is safe: the status
        is an indexed static entry (``:status 200``, ``204``...) and nothing in the
        block changes the dynamic table (no incremental indexing, no size update), so
        skipping it leaves the table in step. 0: the block must go to :meth:`decode`.

        A client that keeps nothing of a 2xx answer but its status (an APNs 200 carries
        a fresh ``apns-id`` every time, so it is never the same block twice) saves
        hpack's ~10 us a block. Indexes and string lengths are not validated here. The
        answer depends on the bytes alone, so repeated blocks are looked up."""
        known = self._statuses.get(block)
        if known is not None:
            return known
        status = self._scan_status(block)
        if len(self._statuses) >= self._cache_size:
            self._statuses.clear()
        self._statuses[block] = status
        return status

    @staticmethod
    def _scan_status(block: bytes) -> int:
        if not block:
            return 0
        status = _STATIC_STATUS.get(block[0], 0)
        if not status:
            return 0
        offset, end = 1, len(block)
        try:
            while offset < end:
                first = block[offset]
                if first & 0x80:  # indexed field
                    offset = _skip_integer(block, offset, 0x7F)
                elif first & 0xE0:  # with incremental indexing, or a table size update
                    return 0
                else:  # literal without indexing or never indexed: skip name and value
                    if first & 0x0F == 0:
                        offset = _skip_string(block, offset + 1)
                    else:
                        offset = _skip_integer(block, offset, 0x0F)
                    offset = _skip_string(block, offset)
        except IndexError:
            return 0  # truncated: let the decoder say what is wrong
        return status if offset == end else 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's fields; raises ``hpack.exceptions.HPACKError`` if malformed."""
        fields = self._cache.get(block)
        if fields is not None:
            return fields
        size, front = self._table_state()
        unchanged = False
        try:
            fields = list(self.decoder.decode(block, raw=True))
            new_size, new_front = self._table_state()
            unchanged = new_size == size and new_front is front
        finally:
            if not unchanged:  # even when a block failed halfway
                self._cache.clear()
        if unchanged and len(block) <= self._longest:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[block] = fields
        return fields
