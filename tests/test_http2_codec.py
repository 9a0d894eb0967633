"""pushfan.http2's header encoders, judged by hpack's decoder (an implementation not ours).

Whatever sequence of blocks, table-size changes and repeats the encoders produce, a
peer decoding them in order must read exactly the fields that were given.
"""

from __future__ import annotations

from typing import Any

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st

from pushfan import http2

_names = st.sampled_from(
    [":method", ":path", ":authority", "authorization", "content-length", "apns-topic", "x-a"]
)
_values = st.sampled_from(["", "POST", "GET", "/", "200", "v", "x" * 300, "y" * 1500]) | st.text(
    alphabet="abcdef0123456789/-_.", max_size=40
)
_fields = st.lists(st.tuples(_names, _values), max_size=8)
_steps = st.lists(
    st.tuples(
        _fields,
        st.booleans(),  # :path never indexed
        st.none() | st.sampled_from([0, 64, 256, 4096, 8192]),  # the peer's table size first
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_indexing_encoder_blocks_decode_to_the_fields_given(steps: list[Any]) -> None:
    encoder = http2.IndexingEncoder(http2.HeaderEncoder())
    decoder = hpack.Decoder()
    for fields, unique_path, table_size in steps:
        if table_size is not None:
            decoder.max_allowed_table_size = table_size  # what we would advertise
            encoder.set_table_size(table_size)
        block = encoder.block(fields, {":path"} if unique_path else ())
        decoded = [(n, v) for n, v in decoder.decode(block, raw=True)]
        assert decoded == [(n.encode(), v.encode()) for n, v in fields]
        assert decoder.header_table._current_size <= decoder.max_allowed_table_size


def test_repeated_fields_become_one_byte_each() -> None:
    encoder = http2.IndexingEncoder(http2.HeaderEncoder())
    fields = [(":authority", "api.push.apple.com"), ("authorization", "bearer " + "j" * 200)]
    first = encoder.block([*fields, (":path", "/3/device/aa")], {":path"})
    second = encoder.block([*fields, (":path", "/3/device/bb")], {":path"})

    assert len(first) > 200
    assert second[:2] == bytes([0x80 | 63, 0x80 | 62])  # the newest entry is index 62
    assert len(second) == 2 + len(http2.encode_field(b":path", b"/3/device/bb"))


def test_a_full_table_is_emptied_at_the_start_of_a_block() -> None:
    encoder = http2.IndexingEncoder(http2.HeaderEncoder(), table_size=400)
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 400
    for i in range(10):  # each JWT ~300 bytes: only one fits at a time
        block = encoder.block([("authorization", f"{i}" * 300)])
        assert decoder.decode(block, raw=True) == [(b"authorization", f"{i}".encode() * 300)]
        assert len(decoder.header_table.dynamic_entries) == 1
