"""Cut a file into element-aligned chunks. Pure: bytes and sizes in, ranges out."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from zipfs.errors import FormatError, ZipfsError
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


def pread_exact(fd: int, n: int, off: int) -> bytes:
    """n bytes at off; ZipfsError when the file is shorter (it shrank while being read)."""
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, min(n - got, 64 << 20), off + got)
        if not b:
            raise ZipfsError(f"file shrank while being read (wanted {n} bytes at {off})")
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_prefix(fd: int, size: int) -> bytes:
    """The bytes plan_file looks at: the 8-byte length and, when that is a plausible
    safetensors header length, the header (so planning never reads the whole file)."""
    first = pread_exact(fd, min(size, 9), 0)
    try:
        n = st.header_length(first[:8], size)
    except FormatError:
        return first
    return first[:8] + pread_exact(fd, n, 8)


def open_regular(path: Path, expect: os.stat_result | None = None) -> int:
    """A read descriptor of a regular file; never blocks (a FIFO is refused, not waited on).

    With expect (the file's lstat when its tree was listed), a symbolic link is not followed and
    the file must still be that one: a file swapped for a link (or a directory above it for a
    link) between listing and reading would otherwise be read from wherever the link points.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if expect is not None else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ZipfsError(f"cannot read {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ZipfsError(f"{path}: not a regular file")
    if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
        os.close(fd)
        raise ZipfsError(f"{path}: replaced while being ingested (it is not the file that was listed)")
    return fd
