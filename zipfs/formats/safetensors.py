"""safetensors header parsing with the same strictness as the safetensors library.

A file that fails validation is still stored byte-exact (as an opaque file); the error message
says why it was not treated as safetensors. Pure functions: bytes in, structures out.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from zipfs.codec.blocks import Layout
from zipfs.errors import FormatError

#: safetensors refuses headers above this size (100 MB); so do we.
MAX_HEADER_LEN = 100_000_000
#: tensors per file, safetensors or GGUF, beyond which a file is stored as opaque bytes: real
#: checkpoints hold a few thousand per file (a shard of a 256-expert MoE ~10k), while a hostile
#: header of a million empty tensors would cost minutes and GBs to plan
MAX_TENSORS = 65536


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its size and how the codec should split it into byte planes."""

    name: str
    bits: int
    #: bytes per element as the codec sees it (sub-byte types are coded bytewise)
    width: int
    #: an IEEE-style float with an 8-bit exponent right below the sign bit (BF16, F32): the codec
    #: rotates the sign to the bottom so the exponent fills one whole byte plane
    exp8: bool = False
    #: quantized blocks (GGUF): width is the block size and the codec splits the block's fields
    layout: Layout | None = None


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 8, 1),
        DType("F4", 4, 1),
        DType("F6_E2M3", 6, 1),
        DType("F6_E3M2", 6, 1),
        DType("U8", 8, 1),
        DType("I8", 8, 1),
        DType("F8_E5M2", 8, 1),
        DType("F8_E4M3", 8, 1),
        DType("F8_E8M0", 8, 1),
        DType("I16", 16, 2),
        DType("U16", 16, 2),
        DType("F16", 16, 2),
        DType("BF16", 16, 2, exp8=True),
        DType("I32", 32, 4),
        DType("U32", 32, 4),
        DType("F32", 32, 4, exp8=True),
        DType("C64", 64, 4, exp8=True),
        DType("I64", 64, 8),
        DType("U64", 64, 8),
        DType("F64", 64, 8),
    )
}

#: opaque bytes (headers, padding, non-tensor files)
OPAQUE = DType("OPAQUE", 8, 1)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: its name, dtype, shape and absolute byte range [start, end) in the file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated header. Tensors are sorted by file offset."""

    header_len: int
    metadata: dict[str, str] | None
    tensors: tuple[TensorInfo, ...]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def header_length(first8: bytes, file_size: int) -> int:
    """Read and bound the 8-byte little-endian header length."""
    if file_size < 8 or len(first8) < 8:
        raise FormatError(f"file is {file_size} bytes, too short for a safetensors header length")
    (n,) = struct.unpack("<Q", first8[:8])
    if n > MAX_HEADER_LEN:
        raise FormatError(f"header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes")
    if 8 + n > file_size:
        raise FormatError(f"header length {n} runs past the end of the {file_size}-byte file")
    if n < 2:
        raise FormatError(f"header length {n} is too short for a JSON object")
    return n


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r} in header")
        out[k] = v
    return out


def _parse_tensor(name: str, spec: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"tensor {name!r}: unknown dtype {spec['dtype']!r}")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"tensor {name!r}: shape must be a list of non-negative integers")
    offs = spec["data_offsets"]
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int and o >= 0 for o in offs)
    ):
        raise FormatError(f"tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offs
    if begin > end:
        raise FormatError(f"tensor {name!r}: data_offsets [{begin}, {end}] are reversed")
    if end > data_len:
        raise FormatError(
            f"tensor {name!r}: data_offsets end {end} is past the {data_len}-byte data section"
        )
    nbits = math.prod(shape) * dtype.bits
    if nbits % 8 or nbits // 8 != end - begin:
        raise FormatError(
            f"tensor {name!r}: shape {shape} x {dtype.name} is {nbits / 8:g} bytes "
            f"but data_offsets span {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def parse_header(header_bytes: bytes, file_size: int) -> Header:
    """Validate the JSON header (the bytes after the length prefix) of a file of file_size bytes.

    Rules follow the safetensors library: UTF-8 JSON object starting with '{', known dtypes,
    shape x dtype size equal to the offsets' span, offsets inside the data section and not
    overlapping. Unlike the library we accept gaps between tensors and trailing bytes: they are
    kept as opaque bytes, so nothing is lost and the tensors still compress well.
    """
    n = len(header_bytes)
    if not header_bytes.startswith(b"{"):
        raise FormatError("header does not start with '{'")
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise FormatError(f"header is not valid JSON ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise FormatError("header JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise FormatError("header JSON is not an object")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    if len(obj) > MAX_TENSORS:
        raise FormatError(f"{len(obj)} tensors, more than the {MAX_TENSORS} zipfs plans by tensor")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise FormatError("__metadata__ must map strings to strings")
    tensors = sorted(
        (_parse_tensor(name, spec, data_start, data_len) for name, spec in obj.items()),
        key=lambda t: (t.start, t.end),
    )
    for prev, cur in itertools.pairwise(tensors):
        if cur.start < prev.end:
            raise FormatError(f"tensors {prev.name!r} and {cur.name!r} overlap")
    return Header(n, metadata, tuple(tensors))


@dataclass(frozen=True)
class Segment:
    """A contiguous byte range of the file and the dtype its chunks are coded with."""

    start: int
    end: int
    dtype: DType
    tensor: TensorInfo | None = None


class Layouted(Protocol):
    """What segments needs of a parsed header (safetensors or GGUF)."""

    @property
    def data_start(self) -> int: ...

    @property
    def tensors(self) -> Sequence[TensorInfo]: ...


def segments(header: Layouted, file_size: int) -> list[Segment]:
    """Cover [0, file_size) in order: the header, each tensor (sorted by offset, not
    overlapping), and any gap as opaque bytes."""
    out = [Segment(0, header.data_start, OPAQUE)]
    pos = header.data_start
    for t in header.tensors:
        if t.start > pos:
            out.append(Segment(pos, t.start, OPAQUE))
        if t.nbytes:
            out.append(Segment(t.start, t.end, t.dtype, t))
        pos = max(pos, t.end)
    if pos < file_size:
        out.append(Segment(pos, file_size, OPAQUE))
    return out


def build(tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
          metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors {name: (dtype, shape, raw bytes)} as safetensors (for fixtures and tests)."""
    head: dict[str, object] = {}
    if metadata is not None:
        head["__metadata__"] = metadata
    off = 0
    for name, (dtype, shape, raw) in tensors.items():
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    js = json.dumps(head, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js + b"".join(raw for _, _, raw in tensors.values())
