"""How a chunk of a given dtype is encoded, standalone or against its base: one place for the
ingest and for base scoring, so the two never code the same bytes differently."""

from __future__ import annotations

from zipfs.codec import chunk as codec
from zipfs.formats.safetensors import DType


def plain(raw: bytes | memoryview, dtype: DType, level: int = codec.DEFAULT_LEVEL) -> codec.Encoded:
    """Standalone coding: byte planes by element width, or a quantized block's fields."""
    return codec.encode(raw, dtype.width, dtype.exp8, level=level, layout=dtype.layout)


def delta_mode(dtype: DType) -> int:
    """The delta transform for a dtype: integer difference for numbers (a small change of a
    float is a small difference), XOR for quantized blocks (fields of mixed types)."""
    return codec.XOR if dtype.layout else codec.SUB


def delta(raw: bytes | memoryview, dtype: DType, base: bytes | memoryview,
          level: int = codec.DEFAULT_LEVEL) -> codec.Encoded:
    """Coding against the base chunk's bytes (same elements, same dtype after widening)."""
    return codec.encode(raw, dtype.width, dtype.exp8, base=base, delta=delta_mode(dtype), level=level,
                        layout=dtype.layout)
