"""Byte-range reconstruction of stored files: decode only the chunks a range touches."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from zipfs.errors import CorruptChunkError, NotFoundError, StoreError
from zipfs.read.chunks import ChunkSource
from zipfs.store import inodes, names
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

    @classmethod
    def empty(cls) -> FileLayout:
        return cls(0, [0], [])

    def extents(self, offset: int, size: int) -> Iterator[tuple[int, int, int, int]]:
        """(chunk id, start inside chunk, end inside chunk, chunk length) for
        [offset, offset+size) ∩ file."""
        end = min(offset + size, self.size)
        if offset >= end:
            return
        i = bisect.bisect_right(self.starts, offset) - 1
        while i < len(self.chunk_ids) and self.starts[i] < end:
            lo = max(offset, self.starts[i]) - self.starts[i]
            hi = min(end, self.starts[i + 1]) - self.starts[i]
            yield self.chunk_ids[i], lo, hi, self.starts[i + 1] - self.starts[i]
            i += 1


def check_length(cid: int, data: bytes | memoryview, n: int) -> bytes | memoryview:
    """data, when chunk cid decoded to the length its file's extent says."""
    if len(data) != n:
        raise CorruptChunkError(f"chunk {cid} decodes to {len(data)} bytes where its file expects {n}")
    return data


def layout_of(store: Store, txn: object, node: inodes.Inode, path: str) -> FileLayout:
    """The extent index of a regular file's stored content; NotFoundError for anything else."""
    if not node.is_reg:
        what = "a directory" if node.is_dir else "a symbolic link" if node.is_link else "a special file"
        raise NotFoundError(f"{path}: is {what}, not a file")
    if node.content == inodes.STAGED:
        raise NotFoundError(f"{path}: is still being ingested (staged); read it through the mount")
    if node.content == inodes.NONE:
        return FileLayout.empty()
    try:
        return FileLayout.of(store.file(txn, node.content_id))
    except StoreError as e:
        raise StoreError(f"{path}: {e}") from None


class Reader:
    """Reads stored files by path or layout, through one ChunkSource (and its cache)."""

    def __init__(self, store: Store, source: ChunkSource | None = None) -> None:
        self.store = store
        self.source = source if source is not None else ChunkSource(store)

    def layout(self, path: str) -> FileLayout:
        with self.store.read() as txn:
            return layout_of(self.store, txn, inodes.resolve(self.store, txn, path), names.normalize(path))

    def read(self, layout: FileLayout, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the file, short at end of file."""
        parts = [memoryview(check_length(cid, self.source.get(cid), n))[lo:hi]
                 for cid, lo, hi, n in layout.extents(offset, size)]
        return b"".join(parts)

    def iter_file(self, layout: FileLayout, block: int = 8 << 20) -> Iterator[bytes]:
        """The whole file in order, block by block. Chunks behind the pass go to the cache's
        cold list, so a whole-file pass reuses a few buffers instead of filling the cache."""
        for off in range(0, layout.size, block):
            yield self.read(layout, off, block)
            *done, _ = layout.extents(off, block)  # the last one may go on into the next block
            for cid, *_ in done:
                self.source.cache.demote(cid)
