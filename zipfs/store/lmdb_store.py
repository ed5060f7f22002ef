"""The LMDB environment of a store directory, its named databases and read helpers.

Layout of a store directory:
    lmdb/        LMDB data.mdb + lock.mdb
    ingest.lock  flock: ingests hold it shared, gc exclusive (chunks of an unfinished ingest
                 have no references yet and must not be collected)
    mount.lock   flock: mounts hold it shared, compact exclusive
    staging.lock flock: the one writable mount holds it exclusively
    staging/     files written through the mount, named by staging id, until ingested
    lost+found/  staging files recovery found without a journal record (never deleted silently)
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import lmdb
import numpy as np

from zipfs.errors import NotFoundError, StoreError
from zipfs.store import names
from zipfs.store.records import ChunkRecord, FileRecord, NsEntry, key_u64, ns_unpack, u64key
from zipfs.store.writer import Writer

#: 2 added staged files and symbolic links to the namespace, and the `staged` journal
SCHEMA_VERSION = 2
DB_NAMES = ("meta", "ns", "files", "chunks", "payloads", "chunkhash", "models", "staged")
DEFAULT_MAP_SIZE = 1 << 40  # a sparse reservation, not disk use


def default_store_path() -> Path:
    """$ZIPFS_STORE, else ~/.local/share/zipfs."""
    env = os.environ.get("ZIPFS_STORE")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "zipfs"


class Store:
    """An open store. Reads use `read()` transactions; writes go through `writer`."""

    def __init__(self, path: str | os.PathLike[str], create: bool = True,
                 map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = Path(path)
        dbdir = self.path / "lmdb"
        if not (dbdir / "data.mdb").exists():
            if not create:
                raise StoreError(f"no zipfs store at {self.path} (run 'zipfs ingest' to create one)")
            dbdir.mkdir(parents=True, exist_ok=True)
        try:
            self.env = lmdb.open(str(dbdir), map_size=map_size, max_dbs=len(DB_NAMES) + 1,
                                 max_readers=512, readahead=True, sync=True, metasync=True)
        except lmdb.Error as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from None
        self.db = {n: self.env.open_db(n.encode()) for n in DB_NAMES}
        self._check_schema()
        self.writer = Writer(self.env, str(self.path))
        self._data_fd: int | None = None
        self._map_base: int | None = None

    def _check_schema(self) -> None:
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"schema", db=self.db["meta"])
            version = int(raw) if raw is not None else 0
            if version < SCHEMA_VERSION:  # older schemas are subsets of this one
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self.db["meta"])
                return
        if version > SCHEMA_VERSION:
            self.env.close()
            raise StoreError(
                f"store {self.path} has schema {version}, newer than this zipfs supports "
                f"({SCHEMA_VERSION}); upgrade zipfs")

    def close(self) -> None:
        self.writer.close()
        self.env.close()
        if self._data_fd is not None:
            os.close(self._data_fd)
            self._data_fd = None

    def willneed(self, *views: memoryview) -> None:
        """Ask the kernel to read these values' pages now, in one request each.

        Values are views into LMDB's map; a cold page fault reads only the device's readahead
        (often 128 KiB) and waits, so a 1 MiB payload would take several serial round trips.
        """
        if self._map_base is None:
            self._map_base = self._find_map_base()
            self._data_fd = os.open(self.path / "lmdb" / "data.mdb", os.O_RDONLY)
        if not self._map_base:
            return
        for v in views:
            addr = np.frombuffer(v, dtype=np.uint8).ctypes.data
            os.posix_fadvise(self._data_fd, addr - self._map_base, len(v), os.POSIX_FADV_WILLNEED)

    def _find_map_base(self) -> int:
        """Start address of this process's mapping of data.mdb (0 when it cannot be found)."""
        target = str((self.path / "lmdb" / "data.mdb").resolve())
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip() == target and int(parts[2], 16) == 0:
                        return int(parts[0].split("-")[0], 16)
        except OSError:
            pass
        return 0

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction whose values are zero-copy buffers valid inside the block."""
        with self.env.begin(buffers=True) as txn:
            yield txn

    @contextmanager
    def flock(self, name: str, exclusive: bool = False, wait: bool = True) -> Iterator[None]:
        """An advisory lock file in the store; StoreError when busy and not waiting."""
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
                fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"store {self.path} is in use ({name} is held)") from None
            yield
        finally:
            os.close(fd)

    def ingest_lock(self, exclusive: bool = False) -> AbstractContextManager[None]:
        """Ingests share this lock; gc takes it exclusively (unreferenced new chunks stay)."""
        return self.flock("ingest.lock", exclusive)

    def mount_lock(self, exclusive: bool = False, wait: bool = True) -> AbstractContextManager[None]:
        """Mounts share this lock while mounted; compact takes it exclusively."""
        return self.flock("mount.lock", exclusive, wait)

    def next_id(self, txn: lmdb.Transaction, counter: bytes) -> int:
        """Take the next number of a counter kept in the meta table (ids start at 1)."""
        raw = txn.get(counter, db=self.db["meta"])
        n = int(raw) if raw is not None else 1
        txn.put(counter, str(n + 1).encode(), db=self.db["meta"])
        return n

    # ---- read helpers (take a transaction so callers control its lifetime) ----

    def entry(self, txn: lmdb.Transaction, path: str) -> NsEntry:
        """The namespace entry at path (the root is a directory); NotFoundError when absent."""
        path = names.normalize(path)
        if path == "":
            return NsEntry(b"D")
        raw = txn.get(names.encode(path), db=self.db["ns"])
        if raw is None:
            raise NotFoundError(f"{path}: no such file or directory in the store")
        return ns_unpack(raw)

    def file(self, txn: lmdb.Transaction, file_id: int) -> FileRecord:
        raw = txn.get(u64key(file_id), db=self.db["files"])
        if raw is None:
            raise StoreError(f"file record {file_id} is missing")
        return FileRecord.unpack(raw)

    def file_at(self, txn: lmdb.Transaction, path: str) -> FileRecord:
        e = self.entry(txn, path)
        if e.file_id is None:
            what = {b"D": "a directory", b"S": "still being ingested (staged)", b"L": "a symbolic link"}
            raise NotFoundError(f"{names.normalize(path)}: is {what[e.kind]}, not a stored file")
        return self.file(txn, e.file_id)

    def chunk(self, txn: lmdb.Transaction, chunk_id: int) -> ChunkRecord:
        raw = txn.get(u64key(chunk_id), db=self.db["chunks"])
        if raw is None:
            raise StoreError(f"chunk {chunk_id} is missing from the store")
        return ChunkRecord.unpack(raw)

    def payload(self, txn: lmdb.Transaction, chunk_id: int) -> memoryview:
        raw = txn.get(u64key(chunk_id), db=self.db["payloads"])
        if raw is None:
            raise StoreError(f"payload of chunk {chunk_id} is missing from the store")
        return raw

    def walk(self, txn: lmdb.Transaction, prefix: str = "") -> Iterator[tuple[str, NsEntry]]:
        """(path, entry) of everything under prefix, sorted; prefix itself when it is not a directory."""
        prefix = names.normalize(prefix)
        cur = txn.cursor(db=self.db["ns"])
        start = names.encode(prefix + "/") if prefix else b""
        if prefix:
            here = txn.get(names.encode(prefix), db=self.db["ns"])
            if here is None:
                raise NotFoundError(f"{prefix}: no such file or directory in the store")
            if not ns_unpack(here).is_dir:
                yield prefix, ns_unpack(here)
                return
        if not cur.set_range(start):
            return
        for k, v in cur:
            k = bytes(k)
            if not k.startswith(start):
                break
            yield names.decode(k), ns_unpack(v)

    def stored_files(self, txn: lmdb.Transaction, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(path, file id) of every stored file under prefix (staged files and links left out)."""
        for path, e in self.walk(txn, prefix):
            if e.file_id is not None:
                yield path, e.file_id

    def children(self, txn: lmdb.Transaction, path: str) -> Iterator[tuple[str, NsEntry]]:
        """(name, entry) of the direct children of directory `path`, sorted.

        Deeper entries are skipped with one cursor seek per child directory, not walked.
        """
        prefix = names.encode(path + "/") if path else b""
        cur = txn.cursor(db=self.db["ns"])
        ok = cur.set_range(prefix)
        while ok:
            k = bytes(cur.key())
            if not k.startswith(prefix):
                break
            rest = k[len(prefix):]
            slash = rest.find(b"/")
            if slash >= 0:  # inside a child directory: jump past it
                ok = cur.set_range(prefix + rest[:slash] + b"0")  # '0' sorts right after '/'
                continue
            yield names.decode(rest), ns_unpack(cur.value())
            ok = cur.next()

    def models(self, txn: lmdb.Transaction) -> dict[str, dict]:
        """Model records by name: base, why it was chosen, sizes at ingest."""
        return {names.decode(k): json.loads(bytes(v)) for k, v in txn.cursor(db=self.db["models"])}

    def iter_chunks(self, txn: lmdb.Transaction) -> Iterator[tuple[int, ChunkRecord]]:
        for k, v in txn.cursor(db=self.db["chunks"]):
            yield key_u64(bytes(k)), ChunkRecord.unpack(v)
