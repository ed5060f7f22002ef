#!/usr/bin/env python3
"""The published BitX algorithm (ZipLLM), as a baseline for the benchmarks only.

Per tensor: XOR the whole tensor with the base tensor of the same name, dtype and shape (when there
is one), then split the result into an exponent stream and a sign+mantissa stream and zstd-3 each.
Header bytes and tensors without a base match are coded the same way without the XOR. BitX is
defined for BF16; for wider floats the same split (8-bit exponent | the rest) is applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zstandard

from zipfs.formats import safetensors as st


def _tensors(data: bytes) -> tuple[int, dict[str, st.TensorInfo]]:
    n = st.header_length(data[:8], len(data))
    h = st.parse_header(data[8:8 + n], len(data))
    return h.data_start, {t.name: t for t in h.tensors}


def _streams(raw: bytes, dtype: st.DType) -> list[bytes]:
    if not dtype.exp8 or dtype.width not in (2, 4):
        return [raw]
    u = np.frombuffer(raw, dtype=np.uint16 if dtype.width == 2 else np.uint32)
    bits = 8 * dtype.width
    exponent = ((u >> (bits - 9)) & 0xFF).astype(np.uint8)
    sign_mantissa = (u & ((1 << (bits - 9)) - 1)) | ((u >> (bits - 1)) << (bits - 9))
    # sign+mantissa: 8 bits for BF16, 24 bits for F32 (kept as 3 little-endian bytes)
    sm = sign_mantissa.astype(np.uint16 if dtype.width == 2 else np.uint32).view(np.uint8)
    sm = sm.reshape(-1, dtype.width)[:, : dtype.width - 1]
    return [exponent.tobytes(), sm.tobytes()]


def compressed_size(path: Path, base: Path | None = None, level: int = 3) -> int:
    """Bytes BitX stores for `path`, coded against `base` when given."""
    cctx = zstandard.ZstdCompressor(level=level)
    data = path.read_bytes()
    start, tensors = _tensors(data)
    base_data, base_tensors = (base.read_bytes(), _tensors(base.read_bytes())[1]) if base else (b"", {})
    total = len(cctx.compress(data[:start]))
    for name, t in tensors.items():
        raw = data[t.start:t.end]
        b = base_tensors.get(name)
        if b is not None and b.dtype == t.dtype and b.shape == t.shape:
            raw = (np.frombuffer(raw, np.uint8) ^ np.frombuffer(base_data[b.start:b.end], np.uint8)).tobytes()
        total += sum(len(cctx.compress(s)) for s in _streams(raw, t.dtype))
    return total
