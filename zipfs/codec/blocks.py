"""Quantized block layouts (GGUF/ggml): the fields of one block, so the codec can split them apart.

A quantized tensor is a run of fixed-size blocks, each a few f16 scales (and mins) followed by
packed quant codes. Coded as one byte stream, the scales' structure is lost among the codes;
split into one plane per field (each byte of an f16 scale its own plane), the scales compress
to well under half and the codes keep their own statistics. Measured on the SmolLM2 Q4_1 GGUF:
zstd-3 per tensor 0.955 of raw, fields split 0.892.

Pure data and functions. Layout ids are ggml's type numbers (stable: they are written in every
GGUF file), so a stored payload names its layout and decodes without any outside table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """One ggml block type: its name, elements per block and fields as (bytes, element width)."""

    id: int
    name: str
    block_elems: int
    fields: tuple[tuple[int, int], ...]

    @property
    def block_bytes(self) -> int:
        return sum(n for n, _ in self.fields)

    @property
    def planes(self) -> int:
        return sum(w for _, w in self.fields)


_H = (2, 2)  # one f16 scale: two byte planes
LAYOUTS: dict[int, Layout] = {
    t.id: t
    for t in (
        # ggml-common.h block structs, in field order
        Layout(2, "Q4_0", 32, (_H, (16, 1))),
        Layout(3, "Q4_1", 32, (_H, _H, (16, 1))),
        Layout(6, "Q5_0", 32, (_H, (4, 1), (16, 1))),
        Layout(7, "Q5_1", 32, (_H, _H, (4, 1), (16, 1))),
        Layout(8, "Q8_0", 32, (_H, (32, 1))),
        Layout(10, "Q2_K", 256, ((16, 1), (64, 1), _H, _H)),
        Layout(11, "Q3_K", 256, ((32, 1), (64, 1), (12, 1), _H)),
        Layout(12, "Q4_K", 256, (_H, _H, (12, 1), (128, 1))),
        Layout(13, "Q5_K", 256, (_H, _H, (12, 1), (32, 1), (128, 1))),
        Layout(14, "Q6_K", 256, ((128, 1), (64, 1), (16, 1), _H)),
        Layout(15, "Q8_K", 256, ((4, 4), (256, 1), (32, 2))),
        Layout(20, "IQ4_NL", 32, (_H, (16, 1))),
        Layout(23, "IQ4_XS", 256, (_H, (2, 2), (4, 1), (128, 1))),
    )
}


def _views(blocks: np.ndarray, layout: Layout) -> list[np.ndarray]:
    """Strided views of a (blocks, block_bytes) array, one per plane, in plane order."""
    out, at = [], 0
    for n, w in layout.fields:
        f = blocks[:, at:at + n]
        if w == 1:
            out.append(f)
        else:
            f = f.reshape(len(blocks), n // w, w)
            out += [f[:, :, k] for k in range(w)]
        at += n
    return out


def plane_sizes(layout: Layout, nbytes: int) -> list[int]:
    """Bytes in each plane of nbytes of blocks."""
    nblocks = nbytes // layout.block_bytes
    return [nblocks * (n // w) for n, w in layout.fields for _ in range(w)]


def split(raw: bytes | memoryview | np.ndarray, layout: Layout) -> list[np.ndarray]:
    """The planes of whole blocks (len(raw) a multiple of the block size), each contiguous."""
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, layout.block_bytes)
    return [np.ascontiguousarray(v).reshape(-1) for v in _views(a, layout)]


def join(planes: list[np.ndarray], layout: Layout, out: np.ndarray) -> None:
    """Interleave planes (as split made them) back into out, a writable uint8 array of blocks."""
    a = out.reshape(-1, layout.block_bytes)
    for v, p in zip(_views(a, layout), planes, strict=True):
        v[...] = p.reshape(v.shape)
