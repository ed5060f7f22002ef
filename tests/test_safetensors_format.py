"""Strict header validation, on synthetic headers and the real MiniLM file."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import load

from zipfs.errors import FormatError
from zipfs.formats import safetensors as st


def raw_file(header: dict, data: bytes = b"", pad: bytes = b"") -> bytes:
    js = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(js)) + js + data


def parse(blob: bytes) -> st.Header:
    n = st.header_length(blob[:8], len(blob))
    return st.parse_header(blob[8:8 + n], len(blob))


def test_build_round_trips_through_the_safetensors_library():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1, -2, 3], dtype=np.int64)
    blob = st.build({"a": ("F32", a.shape, a.tobytes()), "b": ("I64", b.shape, b.tobytes())},
                    {"format": "np"})
    loaded = load(blob)
    assert np.array_equal(loaded["a"], a) and np.array_equal(loaded["b"], b)
    h = parse(blob)
    assert [t.name for t in h.tensors] == ["a", "b"] and h.metadata == {"format": "np"}
    segs = st.segments(h, len(blob))
    assert segs[0].start == 0 and segs[-1].end == len(blob)
    assert all(x.end == y.start for x, y in zip(segs, segs[1:], strict=False))


def test_real_header_parses(models):
    blob = (models["minilm"] / "model.safetensors").read_bytes()
    h = parse(blob)
    assert len(h.tensors) > 100
    assert {t.dtype.name for t in h.tensors} <= {"F32", "I64"}
    assert h.tensors[-1].end == len(blob)


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 1000) + b"{}", "runs past the end"),
    (struct.pack("<Q", 10**12) + b"{}", "exceeds the limit"),
    (raw_file({}, pad=b"")[:8] + b"[]", "does not start with '{'"),
    (struct.pack("<Q", 3) + b"{\xff}", "not valid UTF-8"),
    (struct.pack("<Q", 5) + b'{"a":', "not valid JSON"),
    (raw_file({"t": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (raw_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "data_offsets span 4"),
    (raw_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4), "past the"),
    (raw_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "reversed"),
    (raw_file({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative"),
    (raw_file({"t": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "exactly dtype"),
    (raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlap"),
    (raw_file({"__metadata__": {"k": 1}}), "__metadata__"),
    (struct.pack("<Q", 15) + b'{"a":1, "a":2 }', "duplicate key"),
    (struct.pack("<Q", 2) + b"{x", "not valid JSON"),
])
def test_invalid_headers_are_refused_with_a_reason(blob, message):
    with pytest.raises(FormatError, match=re.escape(message)):
        parse(blob)


def test_gaps_and_trailing_bytes_become_opaque_segments():
    blob = raw_file({"t": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}}, b"abcdefgh")
    h = parse(blob)
    segs = st.segments(h, len(blob))
    kinds = [(s.end - s.start, s.tensor is not None) for s in segs]
    assert kinds == [(h.data_start, False), (3, False), (2, True), (3, False)]


def test_every_dtype_size_is_checked():
    for d in st.DTYPES.values():
        n = 16
        nbytes = n * d.bits // 8
        blob = raw_file({"t": {"dtype": d.name, "shape": [n], "data_offsets": [0, nbytes]}},
                        b"\0" * nbytes)
        assert parse(blob).tensors[0].nbytes == nbytes
