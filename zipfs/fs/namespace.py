"""The filesystem view of a store, without FUSE: inodes, attributes, directory listings.

Usable as a library (the way ratarmount's core works without FUSE); the FUSE operations call it
from worker threads. Inodes: the root is 1; a stored file is FILE_BIT | file id (stable for the
life of that file version); directories get numbers on first sight, stable while mounted.
"""

from __future__ import annotations

import stat
import threading
import time
from dataclasses import dataclass

from zipfs.errors import NotFoundError, ZipfsError
from zipfs.read.reader import FileLayout
from zipfs.store import names
from zipfs.store.lmdb_store import Store
from zipfs.store.records import FileRecord, TensorEntry

ROOT_INO = 1
FILE_BIT = 1 << 62


@dataclass(frozen=True)
class Entry:
    """What stat shows for one name."""

    ino: int
    is_dir: bool
    size: int
    mtime_ns: int
    path: str

    @property
    def mode(self) -> int:
        # directories are writable so that unlink/rmdir pass permission checks; file content is not
        return (stat.S_IFDIR | 0o755) if self.is_dir else (stat.S_IFREG | 0o444)


@dataclass
class OpenFile:
    """A file's extent index and tensor boundaries, held in RAM while it is open."""

    path: str
    entry: Entry
    layout: FileLayout
    tensors: list[TensorEntry]
    record: FileRecord


class Namespace:
    """Inode <-> path mapping and metadata reads. Thread-safe; every method is a short LMDB read."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.mounted_ns = time.time_ns()
        self._lock = threading.Lock()
        self._dirs: dict[int, str] = {ROOT_INO: ""}
        self._dir_ino: dict[str, int] = {"": ROOT_INO}
        self._next = ROOT_INO + 1
        #: paths of files seen by lookup or listdir, for messages that name a file
        self._file_paths: dict[int, str] = {}

    def dir_entry(self, path: str) -> Entry:
        with self._lock:
            ino = self._dir_ino.get(path)
            if ino is None:
                ino = self._dir_ino[path] = self._next
                self._dirs[ino] = path
                self._next += 1
        return Entry(ino, True, 0, self.mounted_ns, path)

    def _file_entry(self, path: str, fid: int, rec: FileRecord) -> Entry:
        with self._lock:
            self._file_paths[FILE_BIT | fid] = path
        return Entry(FILE_BIT | fid, False, rec.size, rec.mtime_ns, path)

    def dir_path(self, ino: int) -> str:
        with self._lock:
            path = self._dirs.get(ino)
        if path is None:
            raise NotFoundError(f"inode {ino} is not a known directory")
        return path

    def entry(self, ino: int) -> Entry:
        if ino & FILE_BIT:
            with self.store.read() as txn:
                rec = self.store.file(txn, ino & ~FILE_BIT)
            return Entry(ino, False, rec.size, rec.mtime_ns, "")
        return self.dir_entry(self.dir_path(ino))

    def lookup(self, parent: int, name: str) -> Entry | None:
        """The entry for name in directory parent, or None when there is none."""
        base = self.dir_path(parent)
        try:
            path = names.normalize(f"{base}/{name}" if base else name)
        except ZipfsError:  # an unrepresentable name simply does not exist
            return None
        with self.store.read() as txn:
            raw = txn.get(names.encode(path), db=self.store.db["ns"])
            if raw is None:
                return None
            fid = self.store.lookup(txn, path)
            if fid is None:
                return self.dir_entry(path)
            return self._file_entry(path, fid, self.store.file(txn, fid))

    def listdir(self, ino: int) -> list[tuple[str, Entry]]:
        base = self.dir_path(ino)
        out = []
        with self.store.read() as txn:
            for name, fid in self.store.children(txn, base):
                path = f"{base}/{name}" if base else name
                if fid is None:
                    out.append((name, self.dir_entry(path)))
                else:
                    out.append((name, self._file_entry(path, fid, self.store.file(txn, fid))))
        return out

    def open(self, ino: int) -> OpenFile:
        if not ino & FILE_BIT:
            raise NotFoundError(f"inode {ino} is a directory")
        with self.store.read() as txn:
            rec = self.store.file(txn, ino & ~FILE_BIT)
        with self._lock:
            path = self._file_paths.get(ino, f"file #{ino & ~FILE_BIT}")
        entry = Entry(ino, False, rec.size, rec.mtime_ns, path)
        return OpenFile(path, entry, FileLayout.of(rec), rec.tensors, rec)
