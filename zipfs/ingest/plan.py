"""Cut a file into element-aligned chunks. Pure: bytes and sizes in, ranges out."""

from __future__ import annotations

from dataclasses import dataclass

from zipfs.errors import FormatError
from zipfs.formats import safetensors as st

DEFAULT_CHUNK = 1 << 20


@dataclass(frozen=True)
class FilePlan:
    kind: str  # "safetensors" or "opaque"
    #: why a .safetensors file is stored opaque ("" otherwise)
    note: str
    segments: list[st.Segment]


def plan_file(name: str, data: bytes | memoryview, size: int) -> FilePlan:
    """Segments of a file: a valid safetensors file by tensor, anything else as opaque bytes.

    Files named *.safetensors are parsed, and so is any file that starts like one (a length, then
    '{'): validation is strict, so only real safetensors pass. Only the named ones get a note
    saying why they were stored opaque.
    """
    whole = [st.Segment(0, size, st.OPAQUE)] if size else []
    claimed = name.endswith(".safetensors")
    if not claimed and bytes(data[8:9]) != b"{":
        return FilePlan("opaque", "", whole)
    try:
        n = st.header_length(bytes(data[:8]), size)
        header = st.parse_header(bytes(data[8:8 + n]), size)
    except FormatError as e:
        return FilePlan("opaque", f"not treated as safetensors: {e}" if claimed else "", whole)
    return FilePlan("safetensors", "", st.segments(header, size))


def chunk_ranges(seg: st.Segment, chunk_size: int = DEFAULT_CHUNK) -> list[tuple[int, int]]:
    """[start, end) ranges of at most chunk_size bytes, each a whole number of elements.

    The same tensor bytes always give the same ranges, so the chunk at index i of a tensor covers
    the same elements as chunk i of a same-shaped tensor in another model (deltas rely on it).
    """
    step = max(1, chunk_size // seg.dtype.width) * seg.dtype.width
    return [(s, min(s + step, seg.end)) for s in range(seg.start, seg.end, step)]
