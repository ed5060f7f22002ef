"""Chunk codec: byte planes by dtype width, optional XOR delta, per-plane zstd/raw/const.

Pure functions: bytes in, bytes out. A payload is self-describing except for the base chunk a
delta needs, which the caller passes in:

    u8 version | u8 flags | u8 width | u8 reserved | u32 raw_len
    width x (u8 method | u32 stored_len)
    plane data, in plane order

Version 2 holds quantized blocks split into their fields (zipfs/codec/blocks.py): the width
byte counts the planes and the reserved byte names the block layout (ggml's type number).

flags: XOR (payload holds raw ^ base, as BitX does), SUB (payload holds the zigzag-coded integer
difference raw - base per element, modulo 2**bits: a small change of a float is a small integer
difference, where XOR can flip a long run of bits across a carry), ROTL1 (each element rotated left
by one bit before the split, so the 8-bit exponent of BF16/F32 fills one plane, as ZipNN does).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
import zstandard

from zipfs.codec import _planes, blocks
from zipfs.errors import CorruptChunkError

VERSION = 1
VERSION_BLOCKS = 2
FLAG_XOR = 1
FLAG_ROTL1 = 2
FLAG_SUB = 4
#: delta transforms
NONE, XOR, SUB = 0, FLAG_XOR, FLAG_SUB
RAW, ZSTD, CONST = 0, 1, 2
METHOD_NAMES = {RAW: "raw", ZSTD: "zstd", CONST: "const"}

#: a tensor plane is stored raw unless zstd makes it smaller than this fraction of its size (raw
#: planes decode at memory speed; a mantissa plane zstd gets to 0.97 is not worth decoding). Other
#: bytes are stored raw only when zstd does not make them smaller, so that a file is never stored
#: larger than `zstd -3` of it.
RAW_THRESHOLD = 0.95
#: the one default compression level, for every path (CLI ingest, background ingest of the mount)
DEFAULT_LEVEL = 3

_HEAD = struct.Struct("<BBBBI")
_PLANE = struct.Struct("<BI")
_local = threading.local()


def checksum(data: bytes | memoryview) -> int:
    """xxh3-64 of decoded chunk bytes: stored per chunk, verified on every decode."""
    return xxhash.xxh3_64_intdigest(data)


#: zstd with match finding all but disabled: an order-0 entropy coder (Huffman on literals).
#: On the byte planes of float weights it reaches the entropy bound, where zstd-1 is ~8% above it
#: and zstd-3 ~20% (matches found in noise cost more than they save).
ENTROPY = -1000
_ENTROPY_PARAMS = dict(strategy=zstandard.STRATEGY_FAST, min_match=7, window_log=17, hash_log=10,
                       chain_log=6, search_log=1)
#: a plane that entropy coding shrinks below this may hold repeats that LZ coding finds too
LZ_WORTH_TRYING = 0.6
#: the same for planes of 2-byte elements (BF16, F16; 1-byte data is coded LZ first): on the
#: SmolLM2 BF16 family and the MiniLM pair cast to BF16 the LZ tries above this gained 0.5 KB of
#: 330 MB coded while taking 60% of the entropy coding's time; F32 planes gain 0.2% from them
#: (repeated rows of an embedding) and quantized blocks were not measured: both keep 0.6
LZ_WORTH_TRYING_NARROW = 0.2


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("cctx", {})
    if level not in cache:
        if level == ENTROPY:
            params = zstandard.ZstdCompressionParameters(**_ENTROPY_PARAMS)
            cache[level] = zstandard.ZstdCompressor(compression_params=params)
        else:
            cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _zstd_plane(p: np.ndarray, level: int, entropy_first: bool, lz_below: float = LZ_WORTH_TRYING) -> bytes:
    """Smallest zstd frame for a plane: entropy-only coding first for tensor planes, with LZ
    (at `level`) tried as well when that shrinks the plane below `lz_below`; for other bytes LZ first,
    and entropy-only as well when LZ barely compresses them (noise-like bytes such as quantized
    weights stored opaque, where matches cost more than they save)."""
    if not entropy_first:
        lz = _compressor(level).compress(p.data)
        if len(lz) > LZ_WORTH_TRYING * len(p):
            body = _compressor(ENTROPY).compress(p.data)
            if len(body) < len(lz):
                return body
        return lz
    body = _compressor(ENTROPY).compress(p.data)
    if len(body) < lz_below * len(p):
        lz = _compressor(level).compress(p.data)
        if len(lz) < len(body):
            return lz
    return body


@dataclass(frozen=True)
class Encoded:
    """An encoded chunk and what stats need to know about it."""

    payload: bytes
    #: methods used per plane, e.g. (ZSTD, CONST)
    methods: tuple[int, ...]

    @property
    def is_const(self) -> bool:
        return all(m == CONST for m in self.methods)


def _code_planes(planes: list[np.ndarray], level: int, entropy_first: bool,
                 lz_below: float = LZ_WORTH_TRYING) -> tuple[list[bytes], list[int]]:
    """Each plane as the smallest of const, zstd and raw: (plane headers + bodies, methods)."""
    keep = RAW_THRESHOLD if entropy_first else 1.0
    heads, bodies, methods = [], [], []
    for p in planes:
        if len(p) and p.min() == p.max():
            method, body = CONST, p[:1].tobytes()
        else:
            body = _zstd_plane(p, level, entropy_first, lz_below) if len(p) else b""
            method = ZSTD
            if len(body) >= keep * len(p):
                method, body = RAW, p.tobytes()
        heads.append(_PLANE.pack(method, len(body)))
        bodies.append(body)
        methods.append(method)
    return heads + bodies, methods


def encode(raw: bytes | memoryview, width: int = 1, exp8: bool = False,
           base: bytes | memoryview | None = None, delta: int = NONE,
           level: int = DEFAULT_LEVEL, layout: blocks.Layout | None = None) -> Encoded:
    """Encode raw bytes of elements `width` bytes wide; against `base` with `delta` (XOR or SUB).

    With a delta the exponent rotation is skipped: the high bytes of a delta are already mostly
    zero, and rotating moves noise from the sign bit into them. With a block layout (whole
    quantized blocks) the planes are the blocks' fields; its deltas are XOR only.
    """
    n = len(raw)
    if (base is None) != (delta == NONE) or delta not in (NONE, XOR, SUB):
        raise ValueError("a base chunk goes with a delta transform (XOR or SUB), and only then")
    if base is not None and len(base) != n:
        raise ValueError(f"base chunk is {len(base)} bytes, chunk is {n}")
    if layout is not None and n and n % layout.block_bytes == 0:
        if delta == SUB:
            raise ValueError("quantized blocks take XOR deltas, not SUB")
        x = np.frombuffer(raw, dtype=np.uint8)
        if base is not None:
            x = x ^ np.frombuffer(base, dtype=np.uint8)
        parts, methods = _code_planes(blocks.split(x, layout), level, entropy_first=True)
        head = _HEAD.pack(VERSION_BLOCKS, delta, layout.planes, layout.id, n)
        return Encoded(b"".join([head, *parts]), tuple(methods))
    if width not in (1, 2, 4, 8) or n % width:
        width, exp8 = 1, False
    rot = bool(exp8 and width > 1 and delta == NONE)
    flags = delta | (FLAG_ROTL1 if rot else 0)
    # one fused pass (zipfs/codec/_planes.c): delta, rotation and the split into byte planes
    planes = [np.frombuffer(p, dtype=np.uint8) for p in _planes.split(raw, width, rot, delta, base)]
    parts, methods = _code_planes(planes, level, entropy_first=width > 1,
                                  lz_below=LZ_WORTH_TRYING_NARROW if width == 2 else LZ_WORTH_TRYING)
    payload = b"".join([_HEAD.pack(VERSION, flags, width, 0, n), *parts])
    return Encoded(payload, tuple(methods))


def decoded_size(payload: bytes | memoryview) -> int:
    """Bytes a payload decodes to, from its header, so a caller can provide the output buffer."""
    try:
        return _HEAD.unpack_from(payload, 0)[4]
    except struct.error:
        raise CorruptChunkError("chunk payload is truncated") from None


def decode(payload: bytes | memoryview, base: bytes | memoryview | None = None,
           out: Any = None) -> memoryview:
    """Decode a payload into `out` (a writable buffer of exactly the decoded size, e.g. the
    chunk record's raw_len; a fresh one if None); raise CorruptChunkError on anything malformed,
    a size other than out's included.

    Returns a read-only view of `out`. The C kernel validates the format and decodes with the
    GIL released, so a payload that is still on the disk blocks only its own thread.
    """
    if out is None:
        out = np.empty(decoded_size(payload), dtype=np.uint8)
    if len(payload) and payload[0] == VERSION_BLOCKS:
        _decode_blocks(payload, base, np.frombuffer(out, dtype=np.uint8))
        return memoryview(out).toreadonly()
    try:
        _planes.decode(payload, base, out)
    except ValueError as e:
        raise CorruptChunkError(str(e)) from None
    return memoryview(out).toreadonly()


def _decode_blocks(payload: bytes | memoryview, base: bytes | memoryview | None, out: np.ndarray) -> None:
    """Version 2: planes of quantized block fields, decoded with zstandard (which releases the
    GIL) and interleaved by numpy. Every length is checked against the layout before use."""
    _, flags, nplanes, layout_id, n = _HEAD.unpack_from(payload, 0)
    layout = blocks.LAYOUTS.get(layout_id)
    if layout is None or nplanes != layout.planes or flags not in (NONE, XOR) or n % layout.block_bytes \
            or n != len(out) or bool(flags) != (base is not None) or (base is not None and len(base) != n):
        raise CorruptChunkError(f"block payload header is invalid (layout {layout_id}, {nplanes} planes, "
                                f"{n} bytes)")
    sizes = blocks.plane_sizes(layout, n)
    at = _HEAD.size + nplanes * _PLANE.size
    if len(payload) < at:
        raise CorruptChunkError("chunk payload is truncated")
    planes = []
    for k, want in enumerate(sizes):
        method, size = _PLANE.unpack_from(payload, _HEAD.size + k * _PLANE.size)
        body = payload[at:at + size]
        at += size
        if len(body) != size:
            raise CorruptChunkError("chunk payload is truncated")
        if method == CONST and size == 1:
            planes.append(np.full(want, body[0], dtype=np.uint8))
        elif method == RAW and size == want:
            planes.append(np.frombuffer(body, dtype=np.uint8))
        elif method == ZSTD:
            planes.append(np.frombuffer(_unzstd(body, want, "zstd plane"), dtype=np.uint8))
        else:
            raise CorruptChunkError(f"plane {k}: method {method} with {size} bytes is invalid")
    if at != len(payload):
        raise CorruptChunkError("chunk payload has trailing bytes")
    blocks.join(planes, layout, out)
    if base is not None:
        np.bitwise_xor(out, np.frombuffer(base, dtype=np.uint8), out=out)


def lone_frame(payload: bytes) -> bytes | None:
    """The zstd frame of a payload that is nothing else (one plane, no transform), or None.

    Stored bare (a chunk record kind says so), such a chunk costs exactly zstd's own size: a
    small config file is not stored larger than `zstd -3` of it by our 13 header bytes."""
    version, flags, width, _, _ = _HEAD.unpack_from(payload, 0)
    if (version, flags, width) != (VERSION, 0, 1) or payload[_HEAD.size] != ZSTD:
        return None
    return payload[_HEAD.size + _PLANE.size:]


def decode_frame(frame: bytes | memoryview, out: Any) -> memoryview:
    """Decode a bare zstd frame (see lone_frame) into out, which it must fill exactly."""
    view = memoryview(out).cast("B")
    view[:] = _unzstd(frame, len(view), "zstd frame")
    return view.toreadonly()


def _unzstd(frame: bytes | memoryview, want: int, what: str) -> bytes:
    """Exactly `want` bytes from one zstd frame; CorruptChunkError otherwise. The size a frame
    declares is checked first: python-zstandard allocates whatever it says (2**62 bytes from a
    damaged header), whatever max_output_size is."""
    try:
        declared = zstandard.frame_content_size(frame)
        if declared not in (want, -1):
            raise CorruptChunkError(f"{what} declares {declared} bytes, not {want}")
        got = _decompressor().decompress(frame, max_output_size=want)
    except zstandard.ZstdError as e:
        raise CorruptChunkError(f"{what} does not decode: {e}") from None
    if len(got) != want:
        raise CorruptChunkError(f"{what} decodes to {len(got)} bytes, not {want}")
    return got


def _decompressor() -> zstandard.ZstdDecompressor:
    d = _local.__dict__.get("dctx")
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d
