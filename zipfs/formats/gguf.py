"""GGUF header parsing (llama.cpp's model format), strict like the safetensors parser.

A GGUF file is a header (magic, version, key-value metadata, tensor infos), padding to the
alignment, then each tensor's data at an aligned offset. Validation follows llama.cpp's
gguf.cpp: version 2 or 3, little-endian, counts and string lengths bounded by the file, known
tensor types, dims whose first is a whole number of blocks, offsets aligned, inside the file and
not overlapping. A file that fails is still stored byte-exact, as opaque bytes, with the reason.

Pure functions: bytes in, structures out. Shapes are given slowest axis first (numpy order, the
reverse of GGUF's ne[]), so an embedding grown by added tokens grows along its first axis, as in
safetensors.
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass

from zipfs.codec.blocks import LAYOUTS
from zipfs.errors import FormatError
from zipfs.formats.safetensors import DTYPES, MAX_TENSORS, DType, TensorInfo

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: llama.cpp's GGML_MAX_DIMS
MAX_DIMS = 4
#: a header (metadata + tensor infos) larger than this is refused; real ones are a few MiB
MAX_HEADER = 256 << 20

#: ggml type number -> (name, elements per block, bytes per block), as gguf's GGML_QUANT_SIZES
_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}


def _dtype(type_id: int) -> DType:
    """The codec's view of a ggml type: float and integer types as in safetensors, quantized
    blocks with their field layout where it is known, the rest as opaque bytes."""
    name, elems, size = _TYPES[type_id]
    if elems == 1:
        return DTYPES[name]
    layout = LAYOUTS.get(type_id)
    return DType(name, size * 8, size if layout else 1, layout=layout)


DTYPE_BY_ID = {k: _dtype(k) for k in _TYPES}
#: value types of metadata: fixed sizes (string = 8, array = 9 are walked)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


_U64 = struct.Struct("<Q")


class NeedMore(Exception):
    """The header runs past the bytes given (but not past the file): read at least `need`."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


@dataclass(frozen=True)
class Header:
    """A validated GGUF header. Tensors are sorted by file offset."""

    version: int
    alignment: int
    #: end of the tensor infos; data_start is this rounded up to the alignment
    header_end: int
    data_start: int
    tensors: tuple[TensorInfo, ...]


class _Cursor:
    def __init__(self, buf: bytes | memoryview, file_size: int) -> None:
        self.buf, self.pos, self.file_size = buf, 0, file_size

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > self.file_size:
            raise FormatError(f"{what} at byte {self.pos} runs past the end of the "
                              f"{self.file_size}-byte file")
        if end > MAX_HEADER:
            raise FormatError(f"header is larger than {MAX_HEADER >> 20} MiB")
        if end > len(self.buf):
            raise NeedMore(end)
        out = memoryview(self.buf)[self.pos:end]
        self.pos = end
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack(self.take(8, what))[0]

    def count(self, what: str, min_each: int) -> int:
        """A u64 count of items of at least min_each bytes, bounded by what is left of the file."""
        n = self.u64(what)
        if n * min_each > self.file_size - self.pos:
            raise FormatError(f"{what} {n} cannot fit in the rest of the file")
        return n

    def string(self, what: str) -> memoryview:
        return self.take(self.count(f"{what} length", 1), what)

    def skip_strings(self, n: int, what: str) -> None:
        """Step over n length-prefixed strings (a tokenizer's 250k tokens) in one tight loop."""
        buf, pos = self.buf, self.pos
        limit = min(len(buf), self.file_size)
        unpack = _U64.unpack_from
        done = 0
        while done < n and pos + 8 <= limit:
            pos += 8 + unpack(buf, pos)[0]
            done += 1
        if done == n and pos <= limit:
            self.pos = pos
            return
        # ran out of bytes: a length prefix, or a string, reaches past the buffer or the file;
        # take() says which (past the end of the file, or NeedMore)
        end = pos if pos > limit else pos + 8
        self.take(end - self.pos, what)
        raise AssertionError("take() raises past the end of its bytes")


def _skip_value(cur: _Cursor, vtype: int, key: str) -> None:
    """Step over one metadata value (arrays of arrays are refused, as gguf.cpp does)."""
    if vtype in _FIXED:
        cur.take(_FIXED[vtype], f"value of {key!r}")
    elif vtype == _STRING:
        cur.string(f"string value of {key!r}")
    elif vtype == _ARRAY:
        etype = cur.u32(f"array type of {key!r}")
        if etype in _FIXED:
            n = cur.count(f"array length of {key!r}", _FIXED[etype])
            cur.take(n * _FIXED[etype], f"array {key!r}")
        elif etype == _STRING:
            cur.skip_strings(cur.count(f"array length of {key!r}", 8), f"string in array {key!r}")
        else:
            raise FormatError(f"metadata {key!r}: array of type {etype} is not allowed")
    else:
        raise FormatError(f"metadata {key!r}: unknown value type {vtype}")


def _text(raw: memoryview, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not valid UTF-8") from None


def _new_name(cur: _Cursor, seen: set[str], what: str) -> str:
    """A UTF-8 string not seen before (metadata keys and tensor names are unique)."""
    name = _text(cur.string(what), what)
    if name in seen:
        raise FormatError(f"duplicate {what} {name!r}")
    seen.add(name)
    return name


def parse(buf: bytes | memoryview, file_size: int) -> Header:
    """Validate the header at the start of a file of file_size bytes, given its first bytes.

    Raises NeedMore when buf ends before the header does, FormatError when it is not valid GGUF.
    """
    cur = _Cursor(buf, file_size)
    if bytes(cur.take(4, "magic")) != MAGIC:
        raise FormatError("no GGUF magic")
    version = cur.u32("version")
    if version not in (2, 3):
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        hint = " (a big-endian file?)" if swapped in (2, 3) else ""
        raise FormatError(f"GGUF version {version} is not supported (2 or 3){hint}")
    n_tensors = cur.count("tensor count", 8 + 4 + 8 + 4 + 8)
    if n_tensors > MAX_TENSORS:
        raise FormatError(f"{n_tensors} tensors, more than the {MAX_TENSORS} zipfs plans by tensor")
    n_kv = cur.count("metadata count", 8 + 4 + 1)
    alignment = DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for _ in range(n_kv):
        key = _new_name(cur, keys, "metadata key")
        vtype = cur.u32(f"type of {key!r}")
        if key == "general.alignment":
            if vtype != _UINT32:
                raise FormatError("general.alignment is not a uint32")
            alignment = cur.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise FormatError(f"general.alignment {alignment} is not a power of two")
        else:
            _skip_value(cur, vtype, key)
    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = _new_name(cur, names, "tensor name")
        n_dims = cur.u32(f"dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"tensor {name!r}: {n_dims} dimensions (1 to {MAX_DIMS})")
        ne = [cur.u64(f"dims of {name!r}") for _ in range(n_dims)]
        type_id = cur.u32(f"type of {name!r}")
        offset = cur.u64(f"offset of {name!r}")
        infos.append((name, ne, type_id, offset))
    header_end = cur.pos
    data_start = -(-header_end // alignment) * alignment
    if data_start > file_size:
        raise FormatError(f"data section starts at {data_start}, past the end of the {file_size}-byte file")
    tensors = sorted((_tensor(*i, alignment, data_start, file_size) for i in infos),
                     key=lambda t: (t.start, t.end))
    for prev, cur_t in itertools.pairwise(tensors):
        if cur_t.start < prev.end:
            raise FormatError(f"tensors {prev.name!r} and {cur_t.name!r} overlap")
    return Header(version, alignment, header_end, data_start, tuple(tensors))


def _tensor(name: str, ne: list[int], type_id: int, offset: int, alignment: int, data_start: int,
            file_size: int) -> TensorInfo:
    if type_id not in _TYPES:
        raise FormatError(f"tensor {name!r}: unknown tensor type {type_id}")
    tname, elems, size = _TYPES[type_id]
    if ne[0] % elems:
        raise FormatError(f"tensor {name!r}: {ne[0]} elements per row is not a whole number of "
                          f"{tname} blocks of {elems}")
    if offset % alignment:
        raise FormatError(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
    nbytes = math.prod(ne) // elems * size
    start = data_start + offset
    if start + nbytes > file_size:
        raise FormatError(f"tensor {name!r}: its {nbytes} bytes at {start} run past the end of the "
                          f"{file_size}-byte file")
    return TensorInfo(name, DTYPE_BY_ID[type_id], tuple(reversed(ne)), start, start + nbytes)
