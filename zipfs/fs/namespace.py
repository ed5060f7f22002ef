"""The filesystem view of a store, without FUSE: inodes, attributes, directory listings.

Usable as a library (the way ratarmount's core works without FUSE); the FUSE operations call it
from worker threads. Inodes: the root is 1; a stored file is FILE_BIT | file id, a staged file
STAGED_BIT | staging id (both move with renames, since they hang off the entry, not the path);
directories and symbolic links get numbers on first sight, kept while mounted and moved by
renames. When a file changes form (copy-up of a stored file, ingest of a staged one) its old
inode is remembered as moved, so the kernel's handles on it keep working.
"""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from zipfs.errors import NotFoundError, ZipfsError
from zipfs.read.reader import FileLayout
from zipfs.store import names, staging
from zipfs.store.lmdb_store import Store
from zipfs.store.records import DIR, FILE, LINK, STAGED, FileRecord, NsEntry, TensorEntry

ROOT_INO = 1
FILE_BIT = 1 << 62
STAGED_BIT = 1 << 61

#: (size, mtime_ns) of a staged file as the mount sees it now (unflushed writes included)
StagedAttrs = Callable[[int], "tuple[int, int] | None"]


@dataclass(frozen=True)
class Entry:
    """What stat shows for one name."""

    ino: int
    kind: bytes
    size: int
    mtime_ns: int
    path: str
    target: bytes = b""

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def mode(self) -> int:
        if self.kind == DIR:
            return stat.S_IFDIR | 0o755
        if self.kind == LINK:
            return stat.S_IFLNK | 0o777
        return stat.S_IFREG | 0o644


@dataclass
class OpenFile:
    """A stored file's extent index and tensor boundaries, held in RAM while it is open."""

    path: str
    entry: Entry
    layout: FileLayout
    tensors: list[TensorEntry]
    record: FileRecord


class Namespace:
    """Inode <-> path mapping and metadata reads. Thread-safe; every method is a short LMDB read."""

    def __init__(self, store: Store, staged_attrs: StagedAttrs | None = None) -> None:
        self.store = store
        self.mounted_ns = time.time_ns()
        self.staged_attrs = staged_attrs
        self._lock = threading.Lock()
        #: directories and links: inode <-> path
        self._paths: dict[int, str] = {ROOT_INO: ""}
        self._path_ino: dict[str, int] = {"": ROOT_INO}
        self._next = ROOT_INO + 1
        #: paths of files seen by lookup or listdir (for copy-up and messages that name a file)
        self._file_paths: dict[int, str] = {}
        #: inodes of files that changed form -> their new inode
        self._moved: dict[int, int] = {}

    # ---- inode bookkeeping ----

    def path_ino(self, path: str) -> int:
        """The inode of the directory or link at path, made up on first sight."""
        with self._lock:
            ino = self._path_ino.get(path)
            if ino is None:
                ino = self._path_ino[path] = self._next
                self._paths[ino] = path
                self._next += 1
            return ino

    def ino_path(self, ino: int) -> str:
        """The path of a directory or link inode, or of a file inode seen by lookup."""
        with self._lock:
            path = self._paths.get(ino, self._file_paths.get(self.resolve(ino)))
        if path is None:
            raise NotFoundError(f"inode {ino} is not known")
        return path

    def dir_path(self, ino: int) -> str:
        return self.ino_path(ino)

    def resolve(self, ino: int) -> int:
        """Follow an inode that changed form to the one that holds its content now."""
        while ino in self._moved:
            ino = self._moved[ino]
        return ino

    def remember(self, ino: int, path: str) -> None:
        """Note where a file inode is (lookups do this; so do creates)."""
        with self._lock:
            self._file_paths[ino] = path

    def moved(self, old: int, new: int, path: str) -> None:
        """File inode old now lives on as new (copied up, or ingested), at path."""
        with self._lock:
            self._moved[old] = new
            self._file_paths[new] = path

    def renamed(self, old: str, new: str) -> None:
        """Keep inode <-> path maps right after old (and all under it) moved to new."""
        def move(p: str) -> str | None:
            return new + p[len(old):] if p == old or p.startswith(old + "/") else None

        with self._lock:
            for table in (self._paths, self._file_paths):
                for ino, p in list(table.items()):
                    if (to := move(p)) is not None:
                        table[ino] = to
            for p in [p for p in self._path_ino if move(p) is not None]:
                ino = self._path_ino.pop(p)
                self._path_ino[move(p)] = ino

    def forget(self, path: str) -> None:
        """A directory or link was removed: a new one at that path gets a new inode."""
        with self._lock:
            ino = self._path_ino.pop(path, None)
            if ino is not None:
                self._paths.pop(ino, None)

    # ---- entries ----

    def _entry(self, txn: object, path: str, e: NsEntry) -> Entry:
        if e.kind == DIR:
            return Entry(self.path_ino(path), DIR, 0, self.mounted_ns, path)
        if e.kind == LINK:
            return Entry(self.path_ino(path), LINK, len(e.target), self.mounted_ns, path, e.target)
        if e.kind == FILE:
            ino = FILE_BIT | e.id
            rec = self.store.file(txn, e.id)
            size, mtime = rec.size, rec.mtime_ns
        else:
            ino = STAGED_BIT | e.id
            size, mtime = self._staged_size(txn, e.id)
        with self._lock:
            self._file_paths[ino] = path
        return Entry(ino, e.kind, size, mtime, path)

    def _staged_size(self, txn: object, sid: int) -> tuple[int, int]:
        live = self.staged_attrs(sid) if self.staged_attrs else None
        if live is not None:
            return live
        rec = staging.get(txn, self.store, sid)
        return (rec.size, rec.mtime_ns) if rec is not None else (0, self.mounted_ns)

    def entry(self, ino: int) -> Entry:
        ino = self.resolve(ino)
        if ino & FILE_BIT:
            with self.store.read() as txn:
                rec = self.store.file(txn, ino & ~FILE_BIT)
            return Entry(ino, FILE, rec.size, rec.mtime_ns, self._file_paths.get(ino, ""))
        if ino & STAGED_BIT:
            with self.store.read() as txn:
                size, mtime = self._staged_size(txn, ino & ~STAGED_BIT)
            return Entry(ino, STAGED, size, mtime, self._file_paths.get(ino, ""))
        path = self.ino_path(ino)
        with self.store.read() as txn:
            return self._entry(txn, path, self.store.entry(txn, path))

    def child_path(self, parent: int, name: str) -> str:
        """The store path of name in directory parent; ZipfsError for an unrepresentable name."""
        base = self.dir_path(parent)
        return names.normalize(f"{base}/{name}" if base else name)

    def lookup(self, parent: int, name: str) -> Entry | None:
        """The entry for name in directory parent, or None when there is none."""
        try:
            path = self.child_path(parent, name)
        except NotFoundError:
            raise
        except ZipfsError:  # an unrepresentable name simply does not exist
            return None
        with self.store.read() as txn:
            try:
                return self._entry(txn, path, self.store.entry(txn, path))
            except NotFoundError:
                return None

    def listdir(self, ino: int) -> list[tuple[str, Entry]]:
        base = self.dir_path(ino)
        with self.store.read() as txn:
            return [(name, self._entry(txn, f"{base}/{name}" if base else name, e))
                    for name, e in self.store.children(txn, base)]

    def open(self, ino: int) -> OpenFile:
        ino = self.resolve(ino)
        if not ino & FILE_BIT:
            raise NotFoundError(f"inode {ino} is not a stored file")
        with self.store.read() as txn:
            rec = self.store.file(txn, ino & ~FILE_BIT)
        with self._lock:
            path = self._file_paths.get(ino, f"file #{ino & ~FILE_BIT}")
        entry = Entry(ino, FILE, rec.size, rec.mtime_ns, path)
        return OpenFile(path, entry, FileLayout.of(rec), rec.tensors, rec)

    def sha256(self, ino: int) -> str:
        """The sha256 recorded for a stored file (without building its extent index)."""
        ino = self.resolve(ino)
        if not ino & FILE_BIT:
            raise NotFoundError(f"inode {ino} is not a stored file")
        with self.store.read() as txn:
            return self.store.file(txn, ino & ~FILE_BIT).sha256
