"""The frames engine's header decoding does exactly what ``hpack.Decoder`` does.

:class:`RequestDecoder` replaces hpack's Huffman step and
:class:`pushfan.http2.HeaderDecoder` remembers blocks that left the dynamic table as it was;
both must be invisible: same fields, same errors, same table,
over any sequence of blocks (including repeats after the table changed).
"""

from __future__ import annotations

from typing import Any

import hpack
import hpack.hpack
import pytest
from hpack.exceptions import HPACKError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman as hpack_decode_huffman
from hpack.struct import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from pushfan.emulators.server_headers import RequestDecoder, decode_huffman, request_headers
from pushfan.http2 import HeaderDecoder

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def outcome(call: Any, *args: Any) -> Any:
    """What ``call`` returns, or the class of the HPACK error it raises."""
    try:
        result = call(*args)
    except HPACKError as exc:
        return type(exc)
    if isinstance(result, list):
        return [(type(h), bytes(h[0]), bytes(h[1])) for h in result]
    return result


def assert_same_decoding(blocks: list[bytes]) -> None:
    ours, theirs = HeaderDecoder(RequestDecoder()), hpack.Decoder()
    for block in blocks:
        assert outcome(ours.decode, block) == outcome(theirs.decode, block, True)
        table = ours.decoder.header_table
        assert list(table.dynamic_entries) == list(theirs.header_table.dynamic_entries)
        assert ours.decoder.header_table_size == theirs.header_table_size


_names = st.sampled_from(
    [b":path", b":authority", b"authorization", b"content-length", b"x-a", b"x-b", b"x-long"]
)
_values = st.binary(max_size=40) | st.sampled_from([b"", b"v", b"/3/device/" + b"ab" * 32])
_fields = st.lists(st.tuples(_names, _values, st.booleans()), max_size=8)
_specs = st.lists(
    st.tuples(
        _fields,
        st.booleans(),  # Huffman
        st.none() | st.integers(0, 4096),  # a table size update first
        st.none() | st.integers(0, 20),  # or: repeat an earlier block instead
    ),
    max_size=15,
)


@settings(max_examples=300, deadline=None)
@given(_specs)
def test_blocks_decode_as_hpack_decodes_them(specs: list[Any]) -> None:
    encoder, blocks = hpack.Encoder(), list[bytes]()
    for fields, huffman, table_size, repeat in specs:
        if repeat is not None and blocks:
            blocks.append(blocks[repeat % len(blocks)])
            continue
        if table_size is not None:
            encoder.header_table_size = table_size
        headers = [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in fields]
        blocks.append(encoder.encode(headers, huffman=huffman))
    assert_same_decoding(blocks)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=8))
def test_garbage_fails_as_it_fails_in_hpack(blocks: list[bytes]) -> None:
    assert_same_decoding(blocks)


def test_a_remembered_block_is_decoded_again_once_the_table_changed() -> None:
    encoder = hpack.Encoder()
    first = encoder.encode([("x-a", "1")])  # adds x-a: 1 at index 62
    by_index = bytes([0x80 | 62])
    second = encoder.encode([("x-a", "2")])  # adds x-a: 2 at index 62
    blocks = [first, by_index, by_index, second, by_index]
    decoder = HeaderDecoder(RequestDecoder())
    decoded = [decoder.decode(b) for b in blocks]
    assert [d[-1][1] for d in decoded] == [b"1", b"1", b"1", b"2", b"2"]
    assert_same_decoding(blocks)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_huffman_strings_decode_as_in_hpack(raw: bytes) -> None:
    coded = _huffman.encode(raw)
    assert decode_huffman(coded) == hpack_decode_huffman(coded) == raw
    assert outcome(decode_huffman, raw) == outcome(hpack_decode_huffman, raw)  # any bytes


def test_the_faster_huffman_step_is_the_one_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a later hpack stopped calling the overridden method, this fails (slow, not wrong)."""

    def refuse(data: bytes) -> bytes:
        raise AssertionError("hpack's own Huffman decoder was called")

    monkeypatch.setattr(hpack.hpack, "decode_huffman", refuse)
    block = hpack.Encoder().encode([(":path", "/a/long/path/" + "x" * 40)], huffman=True)
    with pytest.raises(AssertionError):
        hpack.Decoder().decode(block)
    assert HeaderDecoder(RequestDecoder()).decode(block) == [
        (b":path", b"/a/long/path/" + b"x" * 40)
    ]


def test_request_headers_keep_the_last_value_as_latin_1() -> None:
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/p"),
        (b"x-a", b"1"),
        (b"x-a", b"caf\xe9"),
        (b"te", b"trailers"),
    ]
    assert request_headers(fields) == {
        ":method": "POST",
        ":scheme": "https",
        ":path": "/p",
        "x-a": "café",
        "te": "trailers",
    }
    assert request_headers([*fields[:2], (b":path", b"")]) is None  # an empty :path
