"""Header blocks for the frames engine (:mod:`.server_frames`): requests in, responses out.

Requests are decoded by ``hpack.Decoder`` (clients index and Huffman-code their headers);
:class:`RequestDecoder` makes it cheaper in two ways, both exact:

- hpack decodes Huffman strings a nibble at a time in Python, ~0.25 us a byte, and
  clients send long strings coded that way on every request (``h2``, hence aioapns, and
  nghttp2 send ``authorization`` never-indexed; unique ``:path`` values are literals).
  They are decoded here a byte at a time, on transitions built from hpack's own table,
  and recent ones are remembered (a provider JWT repeats on every request);
- hpack spends ~3 us a field. Clients often resend the very same block (a constant path
  and headers): :class:`pushfan.http2.HeaderDecoder` remembers blocks that left the
  dynamic table as it was, until the table next changes.

Responses use :func:`pushfan.http2.encode_field`: literals without indexing and exact
static-table matches, so nothing depends on the client's table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import hpack
from hpack.exceptions import HPACKDecodingError
from hpack.hpack import decode_integer
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple

from pushfan.http2 import HeaderEncoder, encode_field

HEADER_TABLE_SIZE = 4096  # the default: the server never advertises another
_MEMO_SIZE = 1024  # Huffman strings remembered (cleared when full)...
_MEMO_LONGEST = 1024  # ...if at most this long (coded), so the memo stays small
_CACHED_LONGEST = 128  # longest header name or value worth caching

# (state << 8 | input byte) -> (next state << 8, bytes emitted, string may end here)
_steps: list[tuple[int, bytes, int] | None] = [None] * (256 * 256)
_memo: dict[bytes, bytes] = {}


def _step(index: int) -> tuple[int, bytes, int]:
    """One input byte from one state: two nibble steps of hpack's state table."""
    state, emitted, flags = index >> 8, bytearray(), 0
    for nibble in (index >> 4 & 0xF, index & 0xF):
        state, flags, symbol = HUFFMAN_TABLE[state * 16 + nibble]
        if flags & HUFFMAN_FAIL:
            raise HPACKDecodingError("Invalid Huffman string")
        if flags & HUFFMAN_EMIT_SYMBOL:
            emitted.append(symbol)
    entry = (state << 8, bytes(emitted), flags & HUFFMAN_COMPLETE)
    _steps[index] = entry
    return entry


def decode_huffman(data: bytes) -> bytes:
    """What ``hpack.huffman_table.decode_huffman`` returns (or raises), ~3x faster."""
    decoded = _memo.get(data)
    if decoded is not None:
        return decoded
    steps, out, state, complete = _steps, bytearray(), 0, 1
    for byte in data:
        state, emitted, complete = steps[state | byte] or _step(state | byte)
        out += emitted
    if not complete:
        raise HPACKDecodingError("Incomplete Huffman string")
    decoded = bytes(out)
    if len(data) <= _MEMO_LONGEST:
        if len(_memo) >= _MEMO_SIZE:
            _memo.clear()
        _memo[data] = decoded
    return decoded


def _string(data: bytes | memoryview, offset: int) -> tuple[bytes, int]:
    """The string literal at ``offset`` (RFC 7541 5.2) and the offset past it."""
    length, consumed = decode_integer(data[offset:], 7)
    start = offset + consumed
    raw = bytes(data[start : start + length])
    if len(raw) != length:
        raise HPACKDecodingError("Truncated header block")
    return (decode_huffman(raw) if data[offset] & 0x80 else raw), start + length


class RequestDecoder(hpack.Decoder):
    """``hpack.Decoder`` with a faster Huffman step (see the module docstring); wrap it
    in :class:`pushfan.http2.HeaderDecoder` for the cache of repeated blocks.

    The literal step overrides a private method, hpack's since version 3; were a later
    hpack to stop calling it, decoding would stay correct, only slower (a test would
    notice).
    """

    def __init__(self) -> None:
        super().__init__()
        self.max_allowed_table_size = HEADER_TABLE_SIZE

    def _decode_literal(
        self, data: bytes | memoryview, should_index: bool
    ) -> tuple[HeaderTuple, int]:
        first = data[0]
        if should_index:  # literal with incremental indexing: 6-bit name index
            name_index, prefix, never = first & 0x3F, 6, False
        else:  # without indexing (0000) or never indexed (0001): 4-bit name index
            name_index, prefix, never = first & 0x0F, 4, bool(first & 0x10)
        if name_index:
            index, offset = decode_integer(data, prefix)
            name = self.header_table.get_by_index(index)[0]
        else:
            name, offset = _string(data, 1)
        value, offset = _string(data, offset)
        if should_index:
            self.header_table.add(name, value)
        return (NeverIndexedHeaderTuple if never else HeaderTuple)(name, value), offset


_PSEUDO = frozenset({":method", ":path", ":scheme", ":authority"})
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_names: dict[bytes, str] = {name.encode(): name for name in _PSEUDO}  # checked names


def _name(raw: bytes) -> str | None:
    """A header name as a ``str`` if HTTP/2 allows it in a request, else None."""
    name = _names.get(raw)
    if name is None:
        if not raw or raw.lower() != raw or raw in _CONNECTION_SPECIFIC or raw[:1] == b":":
            return None
        name = raw.decode("latin-1")
        if len(raw) <= _CACHED_LONGEST:
            if len(_names) > 4096:
                _names.clear()
                _names.update({p.encode(): p for p in _PSEUDO})
            _names[raw] = name
    return name


def request_headers(fields: Iterable[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """Decoded request fields as a dict (pseudo-headers included), or None if the request
    is malformed (RFC 9113 8.2-8.3): an upper-case or connection-specific name, a pseudo-
    header unknown, repeated or after a regular one, no ``:method``, ``:scheme`` or
    ``:path``, a ``te`` other than ``trailers``. Names are lower-case, values latin-1, and
    a repeated header keeps its last value."""
    headers: dict[str, str] = {}
    regular = False
    for raw, value in fields:
        name = _name(raw)
        if name is None:
            return None
        if name in _PSEUDO:
            if regular or name in headers:
                return None
        else:
            regular = True
        headers[name] = value.decode("latin-1")
    if ":method" not in headers or ":scheme" not in headers or not headers.get(":path"):
        return None
    te = headers.get("te")
    return None if te is not None and te != "trailers" else headers


_status_fields: dict[int, bytes] = {}
_encoder = HeaderEncoder(longest=_CACHED_LONGEST)


def response_block(status: int, headers: Sequence[tuple[str, str]], length: int) -> bytes:
    """A response's header block: ``:status``, ``headers``, then ``content-length`` if
    ``length`` (names must be lower-case)."""
    block = _status_fields.get(status)
    if block is None:
        block = _status_fields[status] = encode_field(b":status", str(status).encode())
    for name, value in headers:
        block += _encoder.field(name, value)
    if length:
        block += _encoder.field("content-length", str(length))
    return block
