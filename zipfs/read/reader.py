"""Byte-range reconstruction of stored files: decode only the chunks a range touches."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from zipfs.read.chunks import ChunkSource
from zipfs.store.lmdb_store import Store
from zipfs.store.records import FileRecord


@dataclass
class FileLayout:
    """A file's extent index, kept in RAM: extent i covers [starts[i], starts[i+1])."""

    size: int
    starts: list[int]
    chunk_ids: list[int]

    @classmethod
    def of(cls, rec: FileRecord) -> FileLayout:
        starts = rec.offsets.tolist() + [rec.size]
        return cls(rec.size, starts, rec.chunk_ids.tolist())

    def extents(self, offset: int, size: int) -> Iterator[tuple[int, int, int]]:
        """(chunk id, start inside chunk, end inside chunk) for [offset, offset+size) ∩ file."""
        end = min(offset + size, self.size)
        if offset >= end:
            return
        i = bisect.bisect_right(self.starts, offset) - 1
        while i < len(self.chunk_ids) and self.starts[i] < end:
            lo = max(offset, self.starts[i]) - self.starts[i]
            hi = min(end, self.starts[i + 1]) - self.starts[i]
            yield self.chunk_ids[i], lo, hi
            i += 1


class Reader:
    """Reads stored files by path or layout, through one ChunkSource (and its cache)."""

    def __init__(self, store: Store, source: ChunkSource | None = None) -> None:
        self.store = store
        self.source = source if source is not None else ChunkSource(store)

    def layout(self, path: str) -> FileLayout:
        with self.store.read() as txn:
            return FileLayout.of(self.store.file_at(txn, path))

    def read(self, layout: FileLayout, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the file, short at end of file."""
        parts = [memoryview(self.source.get(cid))[lo:hi] for cid, lo, hi in layout.extents(offset, size)]
        return b"".join(parts)

    def iter_file(self, layout: FileLayout, block: int = 8 << 20) -> Iterator[bytes]:
        """The whole file in order, block by block. Chunks behind the pass go to the cache's
        cold list, so a whole-file pass reuses a few buffers instead of filling the cache."""
        for off in range(0, layout.size, block):
            yield self.read(layout, off, block)
            *done, _ = layout.extents(off, block)  # the last one may go on into the next block
            for cid, _, _ in done:
                self.source.cache.demote(cid)
