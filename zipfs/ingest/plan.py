"""Plan a file: its format, its segments (header, tensors, padding) and how each is cut into chunks."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zipfs.errors import FormatError, ZipfsError
from zipfs.formats import cdc, gguf
from zipfs.formats import safetensors as st

DEFAULT_CHUNK = 1 << 20
#: a file no parser understands up to this size (a content-defined chunk's largest) is one chunk:
#: one zstd frame of it, as `zstd -3` makes, with nothing to cut. Larger ones are cut by content,
#: so an edit to a tokenizer.json costs the chunks around it, not the file again
SOLID_MAX = 2 << 20
#: this many or more consecutive segments each under SMALL bytes (tiny tensors, their padding)
#: are chunked together as bytes: one chunk per tiny tensor would cost more than the tensor.
#: Tensors of a LoRA adapter (rank 8 x 2048 BF16: 32 KiB) keep chunks of their own, so they
#: still code as planes and deltas
SMALL, RUN_MIN = 4 << 10, 8


@dataclass(frozen=True)
class FilePlan:
    kind: str  # "safetensors", "gguf" or "opaque"
    #: why a .safetensors or .gguf file is stored opaque ("" otherwise)
    note: str
    segments: list[st.Segment]

    @property
    def solid(self) -> bool:
        """Stored as one chunk (see SOLID_MAX)."""
        return self.kind == "opaque" and len(self.segments) == 1 and self.segments[0].end <= SOLID_MAX

    def units(self) -> list[st.Segment]:
        """What is chunked: the segments, with each run of RUN_MIN or more small ones merged into
        one opaque unit (its tensors keep their entries, not chunks of their own)."""
        out: list[st.Segment] = []
        run: list[st.Segment] = []
        for seg in [*self.segments, None]:
            if seg is not None and seg.end - seg.start < SMALL:
                run.append(seg)
                continue
            if len(run) >= RUN_MIN:
                out.append(st.Segment(run[0].start, run[-1].end, st.OPAQUE))
            else:
                out += run
            run = []
            if seg is not None:
                out.append(seg)
        return out

    def ranges(self, fd: int, unit: st.Segment, chunk_size: int = DEFAULT_CHUNK) -> Iterator[tuple[int, int]]:
        """The chunks of a unit: a tensor in element-aligned fixed steps (chunk i of a tensor
        covers the same elements in every model, which deltas rely on), a solid file whole,
        other bytes at content-defined boundaries (an insertion moves only the chunks around it)."""
        if unit.tensor is not None:
            return iter(chunk_ranges(unit, chunk_size))
        if self.solid:
            return iter([(unit.start, unit.end)])
        return cdc.ranges(lambda off, n: pread_exact(fd, n, off), unit.start, unit.end)


def _whole(size: int) -> list[st.Segment]:
    return [st.Segment(0, size, st.OPAQUE)] if size else []


def _gguf_plan(name: str, data: bytes | memoryview, size: int, can_read_more: bool = False) -> FilePlan:
    """A GGUF file by tensor, or opaque with the reason when it is not valid GGUF. When data ends
    before the header does: NeedMore if the caller can read more, else that is the reason."""
    try:
        return FilePlan("gguf", "", st.segments(gguf.parse(data, size), size))
    except gguf.NeedMore:
        if can_read_more:
            raise
        why: Exception = FormatError("header is larger than what was read")
    except FormatError as e:
        why = e
    note = f"not treated as GGUF: {why}" if name.endswith(".gguf") else ""
    return FilePlan("opaque", note, _whole(size))


def plan_file(name: str, data: bytes | memoryview, size: int) -> FilePlan:
    """Segments of a file: a valid safetensors or GGUF file by tensor, anything else as opaque bytes.

    Files named *.safetensors or *.gguf are parsed, and so is any file that starts like one (a
    length, then '{'; the GGUF magic): validation is strict, so only real ones pass. Only the
    named ones get a note saying why they were stored opaque. data: the file's first bytes
    (plan_fd reads as many as the header needs).
    """
    if name.endswith(".gguf") or bytes(data[:4]) == gguf.MAGIC:
        return _gguf_plan(name, data, size)
    claimed = name.endswith(".safetensors")
    if not claimed and bytes(data[8:9]) != b"{":
        return FilePlan("opaque", "", _whole(size))
    try:
        n = st.header_length(bytes(data[:8]), size)
        header = st.parse_header(bytes(data[8:8 + n]), size)
    except FormatError as e:
        return FilePlan("opaque", f"not treated as safetensors: {e}" if claimed else "", _whole(size))
    return FilePlan("safetensors", "", st.segments(header, size))


def plan_fd(fd: int, size: int, name: str) -> FilePlan:
    """Plan an open file, reading only its header: a safetensors header (the 8-byte length and,
    when plausible, the JSON), or a GGUF header read in growing pieces until it parses or is
    found invalid."""
    first = pread_exact(fd, min(size, 9), 0)
    if first[:4] == gguf.MAGIC:
        buf = first + pread_exact(fd, min(size, 1 << 20) - len(first), len(first))
        while True:
            try:
                return _gguf_plan(name, buf, size, can_read_more=True)
            except gguf.NeedMore as e:
                want = min(size, max(e.need, 2 * len(buf)))
                buf += pread_exact(fd, want - len(buf), len(buf))
    try:
        n = st.header_length(first[:8], size)
    except FormatError:
        return plan_file(name, first, size)
    return plan_file(name, first[:8] + pread_exact(fd, n, 8), size)


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


def read_text_inside(root: Path, path: Path, limit: int = 1 << 20) -> str:
    """Up to limit bytes of a small text file (a config, a model card, a ref) at path, following
    links only where they stay inside root; '' for anything else (outside, not a regular file,
    unreadable): reading hints must never wait on a FIFO or read what the tree points away to."""
    try:
        top, real = str(root.resolve()), path.resolve(strict=True)
        if os.path.commonpath([top, real]) != top:
            return ""
        fd = open_regular(real, real.lstat())
    except (OSError, RuntimeError, ZipfsError):
        return ""
    try:
        return os.pread(fd, limit, 0).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


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
