"""The chunk codec round-trips every dtype and delta mode, and rejects damaged payloads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from zipfs.codec import chunk as codec
from zipfs.errors import CorruptChunkError
from zipfs.formats.safetensors import DTYPES

WIDTHS = sorted({(d.width, d.exp8) for d in DTYPES.values()})


@settings(max_examples=200, deadline=None)
@given(data=hs.data(), width_exp=hs.sampled_from(WIDTHS),
       delta=hs.sampled_from([codec.NONE, codec.XOR, codec.SUB]))
def test_round_trip_any_bytes(data, width_exp, delta):
    width, exp8 = width_exp
    n = data.draw(hs.integers(0, 300)) * width
    raw = data.draw(hs.binary(min_size=n, max_size=n))
    base = data.draw(hs.binary(min_size=n, max_size=n)) if delta else None
    enc = codec.encode(raw, width, exp8, base=base, delta=delta)
    assert codec.decode(enc.payload, base) == raw


def test_real_bf16_and_f32_values_round_trip_and_compress(bf16_pair):
    blob = bf16_pair["minilm-bf16"].read_bytes()
    body = blob[len(blob) // 2:len(blob) // 2 + (1 << 20)]
    enc = codec.encode(body, 2, True)
    assert codec.decode(enc.payload) == body
    assert len(enc.payload) < 0.8 * len(body)  # exponent plane compresses, mantissa does not


def test_constant_chunk_is_tiny():
    raw = np.full(1 << 18, 1.5, dtype=np.float32).tobytes()
    enc = codec.encode(raw, 4, True)
    assert enc.is_const and len(enc.payload) < 40
    assert codec.decode(enc.payload) == raw


def test_incompressible_planes_are_stored_raw():
    raw = np.random.default_rng(0).bytes(1 << 16)
    enc = codec.encode(raw, 1)
    assert enc.methods == (codec.RAW,)
    assert len(enc.payload) < len(raw) + 32


def test_identical_base_gives_const_delta():
    raw = np.random.default_rng(1).bytes(1 << 16)
    for delta in (codec.XOR, codec.SUB):
        enc = codec.encode(raw, 4, True, base=raw, delta=delta)
        assert enc.is_const


def test_sub_delta_beats_xor_on_a_small_float_change():
    rng = np.random.default_rng(2)
    base = rng.standard_normal(1 << 16).astype(np.float32)
    tuned = base + base * rng.standard_normal(base.size).astype(np.float32) * 1e-3
    x = codec.encode(tuned.tobytes(), 4, True, base=base.tobytes(), delta=codec.XOR)
    s = codec.encode(tuned.tobytes(), 4, True, base=base.tobytes(), delta=codec.SUB)
    assert len(s.payload) < len(x.payload)


def test_misuse_is_a_value_error():
    with pytest.raises(ValueError):
        codec.encode(b"abcd", 1, base=b"abcd")  # a base without a delta mode
    with pytest.raises(ValueError):
        codec.encode(b"abcd", 1, base=b"abc", delta=codec.XOR)


@settings(max_examples=300, deadline=None)
@given(data=hs.data())
def test_damaged_payloads_raise_or_decode_to_the_checksum_tested_bytes(data):
    raw = np.random.default_rng(3).standard_normal(2048).astype(np.float32).tobytes()
    payload = bytearray(codec.encode(raw, 4, True).payload)
    if data.draw(hs.booleans()):
        payload = payload[:data.draw(hs.integers(0, len(payload) - 1))]
    else:
        i = data.draw(hs.integers(0, len(payload) - 1))
        payload[i] ^= data.draw(hs.integers(1, 255))
    try:
        out = codec.decode(bytes(payload))
    except CorruptChunkError:
        return
    # a flip inside a raw plane decodes; the checksum is what catches it
    assert codec.checksum(out) != codec.checksum(raw) or out == raw


def test_delta_without_base_is_corrupt():
    enc = codec.encode(b"\1" * 64, 4, base=b"\0" * 64, delta=codec.SUB)
    with pytest.raises(CorruptChunkError):
        codec.decode(enc.payload)


@settings(max_examples=300, deadline=None)
@given(data=hs.data())
def test_damaged_delta_payloads_decoded_into_a_given_buffer_never_overrun_it(data):
    rng = np.random.default_rng(4)
    base = rng.standard_normal(4096).astype(np.float32).astype("<f4").view("<u2")[1::2].copy()
    tuned = base + (rng.integers(-3, 4, base.size)).astype("<u2")
    payload = bytearray(codec.encode(tuned.tobytes(), 2, True, base=base.tobytes(), delta=codec.SUB).payload)
    i = data.draw(hs.integers(0, len(payload) - 1))
    payload[i] ^= data.draw(hs.integers(1, 255))
    out = np.full(tuned.nbytes + 64, 0xAB, dtype=np.uint8)  # 64 guard bytes past the chunk
    try:
        got = codec.decode(bytes(payload), base.tobytes(), out[:tuned.nbytes])
    except CorruptChunkError:
        got = None
    assert (out[tuned.nbytes:] == 0xAB).all()
    if got is not None:
        assert codec.checksum(got) != codec.checksum(tuned.tobytes()) or bytes(got) == tuned.tobytes()


def test_a_payload_of_another_size_than_its_record_is_corrupt():
    enc = codec.encode(b"\1\2" * 64, 2)
    with pytest.raises(CorruptChunkError, match="decodes to 128 bytes, not the 130 expected"):
        codec.decode(enc.payload, None, np.empty(130, dtype=np.uint8))
