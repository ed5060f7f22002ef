"""Lossless dtype widenings, so an F32 fine-tune of a BF16 base (or the like) still codes as a delta.

Pure functions. A widened base chunk covers the same elements as the new chunk; since the base's
elements are narrower, one base chunk holds the elements of several new chunks, hence an offset.
"""

from __future__ import annotations

import numpy as np

NONE, BF16_F32, F16_F32, F32_F64 = 0, 1, 2, 3
_PAIRS = {("BF16", "F32"): BF16_F32, ("F16", "F32"): F16_F32, ("F32", "F64"): F32_F64}
#: bytes of base per byte of widened output
FACTOR = {NONE: 1, BF16_F32: 2, F16_F32: 2, F32_F64: 2}


def widening(base_dtype: str, dtype: str) -> int | None:
    """The transform from base_dtype to dtype: NONE when equal, None when there is no exact one."""
    if base_dtype == dtype:
        return NONE
    return _PAIRS.get((base_dtype, dtype))


def widen(raw: bytes | memoryview, xform: int) -> bytes | memoryview:
    """Base bytes in the wider dtype; every value is represented exactly."""
    if xform == NONE:
        return raw
    if xform == BF16_F32:
        return (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).tobytes()
    if xform == F16_F32:
        return np.frombuffer(raw, dtype="<f2").astype("<f4").tobytes()
    if xform == F32_F64:
        return np.frombuffer(raw, dtype="<f4").astype("<f8").tobytes()
    raise ValueError(f"unknown widening {xform}")
