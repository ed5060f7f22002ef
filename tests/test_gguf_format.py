"""The GGUF parser agrees with llama.cpp's reference reader on a real file and refuses hostile
headers with a reason; quantized blocks split into fields round-trip and compress."""

from __future__ import annotations

import struct

import gguf as ref
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from conftest import tiny_gguf
from zipfs.codec import blocks
from zipfs.codec import chunk as codec
from zipfs.errors import CorruptChunkError, FormatError
from zipfs.formats import gguf
from zipfs.ingest.plan import plan_file


def test_parser_matches_the_reference_reader(gguf_file):
    size = gguf_file.stat().st_size
    h = gguf.parse(gguf_file.read_bytes()[:4 << 20], size)
    r = ref.GGUFReader(gguf_file)
    assert h.data_start == r.data_offset and len(h.tensors) == len(r.tensors)
    mine = {t.name: t for t in h.tensors}
    for t in r.tensors:
        m = mine[t.name]
        assert (m.start, m.end - m.start, m.dtype.name) == (t.data_offset, int(t.n_bytes), t.tensor_type.name)
        assert m.shape == tuple(int(x) for x in reversed(t.shape))


def test_block_layouts_match_the_reference_sizes():
    for tid, layout in blocks.LAYOUTS.items():
        elems, size = ref.GGML_QUANT_SIZES[ref.GGMLQuantizationType(tid)]
        assert (layout.name, layout.block_elems, layout.block_bytes) == \
            (ref.GGMLQuantizationType(tid).name, elems, size)
    for tid, (name, elems, size) in gguf._TYPES.items():
        assert ref.GGML_QUANT_SIZES[ref.GGMLQuantizationType(tid)] == (elems, size), name


def test_plan_cuts_header_tensors_and_padding(gguf_file):
    size = gguf_file.stat().st_size
    plan = plan_file("m.gguf", gguf_file.read_bytes()[:4 << 20], size)
    assert plan.kind == "gguf"
    segs = plan.segments
    assert segs[0].start == 0 and segs[-1].end == size
    assert all(a.end == b.start for a, b in zip(segs, segs[1:], strict=False))
    q = [s for s in segs if s.tensor is not None and s.dtype.layout is not None]
    assert q and all((s.end - s.start) % s.dtype.layout.block_bytes == 0 for s in q)


def test_tiny_file_parses():
    blob = tiny_gguf()
    h = gguf.parse(blob, len(blob))
    assert [t.name for t in h.tensors] == ["a", "b"] and h.tensors[1].end - h.tensors[1].start == 68


@pytest.mark.parametrize("over, why", [
    ({"version": 1}, "version 1"),
    ({"version": 0x03000000}, "big-endian"),
    ({"n_tensors": 1 << 60}, "cannot fit"),
    ({"n_kv": 1 << 40}, "cannot fit"),
    ({"alignment": 24}, "power of two"),
    ({"name": b"\xff\xfe"}, None),  # a metadata string value need not be text: fine
    ({"tensors": [(b"a", [32], 0, 0), (b"a", [32], 0, 128)]}, "duplicate tensor"),
    ({"tensors": [(b"a", [32], 99, 0)]}, "unknown tensor type"),
    ({"tensors": [(b"a", [31], 8, 0)]}, "whole number"),
    ({"tensors": [(b"a", [32], 0, 4)]}, "alignment"),
    ({"tensors": [(b"a", [32], 0, 0), (b"b", [32], 0, 96)]}, "overlap"),
    ({"tensors": [(b"a", [1 << 40], 0, 0)]}, "past the end"),
    ({"tensors": [(b"a", [], 0, 0)]}, "dimensions"),
    ({"tensors": [(b"\xc3(", [32], 0, 0)]}, "UTF-8"),
])
def test_hostile_headers_are_refused_with_a_reason(over, why):
    blob = tiny_gguf(**over)
    if why is None:
        gguf.parse(blob, len(blob))
        return
    with pytest.raises(FormatError, match=why):
        gguf.parse(blob, len(blob))
    plan = plan_file("x.gguf", blob, len(blob))
    assert plan.kind == "opaque" and "not treated as GGUF" in plan.note


@settings(max_examples=300, deadline=None)
@given(cut=hs.integers(0, 400), flip=hs.integers(0, 399), bit=hs.integers(0, 7))
def test_any_damaged_header_parses_or_is_refused(cut, flip, bit):
    blob = bytearray(tiny_gguf())
    blob[flip % len(blob)] ^= 1 << bit
    blob = bytes(blob[:max(4, len(blob) - cut)])
    try:
        h = gguf.parse(blob, len(blob))
    except FormatError:
        return
    assert all(0 <= t.start <= t.end <= len(blob) for t in h.tensors)


def test_truncated_buffer_asks_for_more_but_file_end_is_an_error(gguf_file):
    size = gguf_file.stat().st_size
    head = gguf_file.read_bytes()[:1 << 20]
    with pytest.raises(gguf.NeedMore) as e:
        gguf.parse(head, size)
    assert e.value.need > len(head)
    with pytest.raises(FormatError, match="past the end|cannot fit"):
        gguf.parse(head, len(head))


@settings(max_examples=200, deadline=None)
@given(data=hs.data(), tid=hs.sampled_from(sorted(blocks.LAYOUTS)), delta=hs.booleans())
def test_block_fields_round_trip(data, tid, delta):
    layout = blocks.LAYOUTS[tid]
    n = data.draw(hs.integers(1, 20)) * layout.block_bytes
    raw = data.draw(hs.binary(min_size=n, max_size=n))
    base = data.draw(hs.binary(min_size=n, max_size=n)) if delta else None
    enc = codec.encode(raw, base=base, delta=codec.XOR if delta else codec.NONE, layout=layout)
    assert bytes(codec.decode(enc.payload, base)) == raw


def test_block_payload_damage_is_an_error_not_wrong_bytes(gguf_file):
    data = gguf_file.read_bytes()
    h = gguf.parse(data[:4 << 20], len(data))
    t = next(t for t in h.tensors if t.dtype.name == "Q4_1")
    raw = data[t.start:t.start + (1 << 20) // 20 * 20]
    enc = codec.encode(raw, layout=t.dtype.layout)
    assert len(enc.payload) < 0.93 * len(raw)
    rng = np.random.default_rng(3)
    for _ in range(200):
        bad = bytearray(enc.payload)
        bad[int(rng.integers(0, min(len(bad), 64)))] ^= 1 << int(rng.integers(0, 8))
        try:
            out = bytes(codec.decode(bytes(bad)))
        except CorruptChunkError:
            continue
        assert codec.checksum(out) != codec.checksum(raw) or out == raw  # the chunk checksum catches it
    with pytest.raises(CorruptChunkError):
        codec.decode(enc.payload[:-1])


def test_big_endian_files_plan_as_opaque_with_the_reason():
    blob = tiny_gguf(version=0x03000000)
    plan = plan_file("model.gguf", blob, len(blob))
    assert plan.kind == "opaque" and "big-endian" in plan.note
    assert plan_file("notes.txt", b"GGUX", 4).note == ""


def _forge_size(frame: bytes, declared: int) -> bytes:
    """A zstd frame whose header claims another content size (an 8-byte field)."""
    b = bytearray(frame)
    b[4] = 0xE0  # frame header descriptor: 8-byte content size, single segment
    b[5:13] = struct.pack("<Q", declared)
    return bytes(b)


def test_a_forged_zstd_content_size_is_corruption_not_a_memory_error():
    raw = b"the same words again and again " * 2000
    frame = codec.lone_frame(codec.encode(raw).payload)
    with pytest.raises(CorruptChunkError, match="declares"):
        codec.decode_frame(_forge_size(frame, 1 << 62), bytearray(len(raw)))
    layout = blocks.LAYOUTS[8]
    q = np.tile(np.arange(layout.block_bytes, dtype=np.uint8), 4096).tobytes()
    payload = bytearray(codec.encode(q, layout=layout).payload)
    at = payload.find(b"\x28\xb5\x2f\xfd")  # the first zstd plane
    assert at > 0
    payload[at:at + 13] = _forge_size(bytes(payload[at:at + 13]), 1 << 62)
    with pytest.raises(CorruptChunkError):
        codec.decode(bytes(payload))


def test_too_many_tensors_is_opaque_and_notes_stay_one_line():
    many = [(f"t{i}".encode(), [32], 0, 128 * i) for i in range(70000)]
    blob = tiny_gguf(tensors=many, data_256s=0)
    with pytest.raises(FormatError, match="more than the 65536"):
        gguf.parse(blob, len(blob))
    key = b"evil\nkey \x1b[31m"
    evil = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 99)
    plan = plan_file("x.gguf", evil, len(evil))
    assert plan.kind == "opaque" and "unknown value type 99" in plan.note
    assert "\n" not in plan.note and "\x1b" not in plan.note
