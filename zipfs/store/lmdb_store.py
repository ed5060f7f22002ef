"""The LMDB environment of a store directory: its tables, sealed record access, locks, the reserve.

Layout of a store directory (0700; its files 0600):
    lmdb/        LMDB data.mdb + lock.mdb
    reserve      preallocated space given back when the disk is full, so rm and gc still commit
    open.lock    flock: every process with the store open holds it shared, compact exclusively
                 (it swaps data.mdb: a process still mapping the old one would write into a
                 deleted file)
    ingest.lock  flock: ingests hold it shared, gc exclusive (chunks of an unfinished ingest
                 have no references yet and must not be collected)
    staging.lock flock: the one writable mount holds it exclusively
    pins/        one file per process reading file versions (zipfs.store.pins)
    staging/     file versions written through the mount, named by staging id, until ingested
    lost+found/  staging files recovery found without an acknowledged journal record

Tables (every value sealed with a checksum over table, key and value, but payloads):
    meta       schema version and id counters
    inodes     ino -> Inode (mode, owner, times, size, content, parent and name)
    dirents    parent ino + name -> child ino
    files      file id -> FileRecord (a stored file version: extents, sha256)
    chunks     chunk id -> ChunkRecord;  payloads: chunk id -> encoded bytes
    chunkhash  blake3 of raw bytes -> chunk id (dedup)
    models     ino of a model's directory -> its record (base model, sizes)
    staged     staging id -> journal row of a version written through a mount
    orphans    file id -> ino: versions no inode uses any more, kept while that ino is pinned
    xattrs     ino + name -> value (user extended attributes); only the writable mount writes
               it (its getxattr answers from the set of inodes it loaded and added to)
    rindex, rpacks, rlocs, rmodels: what the store knows of its remote (zipfs.remote.tables)
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import lmdb
import numpy as np

from zipfs.errors import NotFoundError, StoreError, ZipfsError
from zipfs.store import datafile
from zipfs.store.records import ChunkRecord, DamagedRecord, FileRecord, seal, u64key, unseal
from zipfs.store.writer import Writer

SCHEMA_VERSION = 4
TABLES = ("meta", "inodes", "dirents", "files", "chunks", "payloads", "chunkhash", "models", "staged",
          "orphans", "xattrs", "rindex", "rpacks", "rlocs", "rmodels")
#: tables of older schemas that an upgrade reads and then empties
OLD_TABLES = ("ns",)
DEFAULT_MAP_SIZE = 1 << 40  # a sparse reservation, not disk use
RESERVE_NAME = "reserve"
#: the reserve: 1/64 of the store's filesystem, between these bounds
RESERVE_MIN, RESERVE_MAX = 4 << 20, 64 << 20

#: called with the key and error of a damaged record met while scanning; the scan goes on
OnDamage = Callable[[bytes, DamagedRecord], None]


def default_store_path() -> Path:
    """$ZIPFS_STORE, else ~/.local/share/zipfs."""
    env = os.environ.get("ZIPFS_STORE")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "zipfs"


def _private(path: Path, mode: int) -> None:
    """Tighten a store path we own to mode (older stores were created 0755/0644)."""
    try:
        st = path.lstat()
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & ~mode:
            os.chmod(path, mode)
    except OSError:
        pass


class Store:
    """An open store. Reads use `read()` transactions; writes go through `writer`."""

    def __init__(self, path: str | os.PathLike[str], create: bool = True,
                 map_size: int = DEFAULT_MAP_SIZE, exclusive: bool = False) -> None:
        self.path = Path(path)
        dbdir = self.path / "lmdb"
        data = dbdir / "data.mdb"
        if not data.exists():
            if not create:
                raise StoreError(f"no zipfs store at {self.path} (run 'zipfs ingest' or 'zipfs mount' "
                                 "to create one)")
            try:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                dbdir.mkdir(mode=0o700, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store {self.path}: {e.strerror}") from None
        #: the store's remote once attached (zipfs.remote.attach): payloads it lacks come from there
        self.remote = None
        self._open_fd = self._open_lock(exclusive)
        try:
            if data.exists():
                datafile.check(data)
            self._open_env(dbdir, data, map_size)
        except BaseException:
            os.close(self._open_fd)
            raise
        self.ensure_reserve()

    def _open_lock(self, exclusive: bool) -> int:
        """Hold open.lock for as long as the store is open: shared (waiting out a compact), or
        exclusive and at once (compact: nothing else may have the store open)."""
        try:
            fd = os.open(self.path / "open.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"store {self.path} is in use (mounted, or open in another zipfs command)") \
                from None
        return fd

    def _open_env(self, dbdir: Path, data: Path, map_size: int) -> None:
        for p, mode in ((self.path, 0o700), (dbdir, 0o700), (data, 0o600), (dbdir / "lock.mdb", 0o600)):
            _private(p, mode)
        try:
            self.env = lmdb.open(str(dbdir), map_size=map_size, max_dbs=len(TABLES) + len(OLD_TABLES) + 1,
                                 max_readers=512, readahead=True, sync=True, metasync=True, mode=0o600)
        except lmdb.Error as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from None
        self._data_fd = -1
        try:
            self._data_fd = os.open(data, os.O_RDONLY)
            self.check_tree(leaves=False)
            self.db = {n: self.env.open_db(n.encode()) for n in TABLES}
            self._map_base = self._find_map_base()
            self._map_size = self.env.info()["map_size"]
            self._data_size = 0
            self.writer = Writer(self.env, str(self.path), on_full=self.release_reserve)
            from zipfs.store import upgrade  # it builds on the namespace layer, which builds on this

            upgrade.open_schema(self)
        except BaseException as e:
            if self._data_fd >= 0:
                os.close(self._data_fd)
            self.env.close()
            if isinstance(e, lmdb.Error):
                raise StoreError(f"cannot open store {self.path}: it is damaged ({e})") from None
            raise

    def close_environment(self) -> None:
        """Close LMDB but keep open.lock (compact swaps the data file while it still holds it)."""
        if self._data_fd < 0:
            return
        self.writer.close()
        self.env.close()
        os.close(self._data_fd)
        self._data_fd = -1

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        self.close_environment()
        if self._open_fd >= 0:
            os.close(self._open_fd)
            self._open_fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the map: values are views into it, checked to lie inside the file ----

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

    def _in_file(self, view: memoryview) -> memoryview:
        """view, once it is known to lie inside data.mdb: a damaged page can make LMDB hand out
        a value running past the end of the file, and touching that is a SIGBUS. (A value a write
        transaction changed lies in that transaction's own memory, outside the map.)"""
        if not self._map_base or not len(view):
            return view
        start = np.frombuffer(view, dtype=np.uint8).ctypes.data - self._map_base
        if not 0 <= start < self._map_size:
            return view
        end = start + len(view)
        if end > self._data_size:
            self._data_size = os.fstat(self._data_fd).st_size
        if end > self._data_size:
            raise DamagedRecord("a record points outside data.mdb: the store is damaged")
        return view

    def willneed(self, *views: memoryview) -> None:
        """Ask the kernel to read these values' pages now, in one request each.

        Values are views into LMDB's map; a cold page fault reads only the device's readahead
        (often 128 KiB) and waits, so a 1 MiB payload would take several serial round trips.
        """
        if not self._map_base:
            return
        for v in views:
            addr = np.frombuffer(v, dtype=np.uint8).ctypes.data
            os.posix_fadvise(self._data_fd, addr - self._map_base, len(v), os.POSIX_FADV_WILLNEED)

    # ---- transactions and records ----

    def check_tree(self, leaves: bool = True) -> None:
        """StoreError when a B-tree of the store is damaged (see datafile.check_tree): checked at
        every open (branch pages), and all of it before the commands that walk every record."""
        data = self.path / "lmdb" / "data.mdb"
        for _ in range(20):  # a snapshot two commits have not yet passed; a store in such heavy use
            # that every try is overtaken is opened unchecked rather than refused
            with self.env.begin() as txn:
                if datafile.check_tree(data, txn.id(), leaves):
                    return

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction whose values are zero-copy buffers valid inside the block."""
        try:
            with self.env.begin(buffers=True) as txn:
                yield txn
        except lmdb.Error as e:
            raise StoreError(f"store {self.path} is damaged or unreadable: {e}") from None

    def get(self, txn: lmdb.Transaction, table: str, key: bytes) -> bytes | None:
        """The value at key (its seal checked), or None."""
        raw = txn.get(key, db=self.db[table])
        if raw is None:
            return None
        return unseal(table, key, self._in_file(raw))

    def put(self, txn: lmdb.Transaction, table: str, key: bytes, value: bytes,
            overwrite: bool = True) -> None:
        """Store value at key, sealed; with overwrite=False an existing key is an error (a new
        id that is already taken means a damaged counter, never something to overwrite)."""
        try:
            done = txn.put(key, seal(table, key, value), db=self.db[table], overwrite=overwrite)
        except lmdb.BadValsizeError:
            raise StoreError(f"{table}: key of {len(key)} bytes is too long for the store") from None
        if not done:
            raise StoreError(f"{table} record {key.hex()[:32]} exists already: the store is damaged "
                             "(run zipfs fsck)")

    def delete(self, txn: lmdb.Transaction, table: str, key: bytes) -> bool:
        return txn.delete(key, db=self.db[table])

    def scan(self, txn: lmdb.Transaction, table: str, prefix: bytes = b"",
             on_damage: OnDamage | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of the records whose key starts with prefix, in key order.

        A damaged record raises DamagedRecord, or with on_damage is reported and skipped.
        """
        cur = txn.cursor(db=self.db[table])
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            k = bytes(self._in_file(k))
            if not k.startswith(prefix):
                break
            try:
                value = unseal(table, k, self._in_file(v))
            except DamagedRecord as e:
                if on_damage is None:
                    raise
                on_damage(k, e)
                continue
            yield k, value

    def local_payload(self, txn: lmdb.Transaction, chunk_id: int) -> memoryview | None:
        """The payload in this store's own file, or None (it may be in the remote)."""
        raw = txn.get(u64key(chunk_id), db=self.db["payloads"])
        return None if raw is None else self._in_file(raw)

    def payload(self, txn: lmdb.Transaction, chunk_id: int) -> memoryview:
        """The payload, from this store or else (fetched, blocking) from its remote."""
        view = self.local_payload(txn, chunk_id)
        if view is not None:
            return view
        if self.remote is not None:
            data = self.remote.payload(txn, chunk_id)
            if data is not None:
                return memoryview(data)
        raise StoreError(f"payload of chunk {chunk_id} is missing from the store")

    def prefetch_payloads(self, txn: lmdb.Transaction, chunk_ids: list[int]) -> None:
        """Start fetching these payloads, which this store lacks, from its remote."""
        if self.remote is not None:
            self.remote.prefetch(txn, chunk_ids)

    def payload_ids(self, txn: lmdb.Transaction, on_damage: OnDamage) -> Iterator[int]:
        """The chunk id of every payload (keys are not sealed: one that is not 8 bytes is damaged)."""
        for k in txn.cursor(db=self.db["payloads"]).iternext(values=False):
            k = bytes(self._in_file(k))
            if len(k) == 8:
                yield int.from_bytes(k, "big")
            else:
                on_damage(k[:16], DamagedRecord(f"a payload key of {len(k)} bytes is damaged"))

    def chunk(self, txn: lmdb.Transaction, chunk_id: int) -> ChunkRecord:
        raw = self.get(txn, "chunks", u64key(chunk_id))
        if raw is None:
            raise StoreError(f"chunk {chunk_id} is missing from the store")
        return ChunkRecord.unpack(raw)

    def file(self, txn: lmdb.Transaction, file_id: int) -> FileRecord:
        raw = self.get(txn, "files", u64key(file_id))
        if raw is None:
            raise StoreError(f"file record {file_id} is missing")
        return FileRecord.unpack(raw)

    def file_at(self, txn: lmdb.Transaction, path: str) -> FileRecord:
        """The stored version of the regular file at path (NotFoundError for anything else)."""
        from zipfs.store import inodes  # the namespace builds on this module

        node = inodes.resolve(self, txn, path)
        if not node.is_reg or node.content != inodes.STORED:
            raise NotFoundError(f"{path}: not a stored file")
        return self.file(txn, node.content_id)

    def iter_chunks(self, txn: lmdb.Transaction,
                    on_damage: OnDamage | None = None) -> Iterator[tuple[int, ChunkRecord]]:
        for k, v in self.scan(txn, "chunks", on_damage=on_damage):
            try:
                yield int.from_bytes(k, "big"), ChunkRecord.unpack(v)
            except DamagedRecord as e:
                if on_damage is None:
                    raise
                on_damage(k, e)

    def next_id(self, txn: lmdb.Transaction, counter: bytes) -> int:
        """Take the next number of a counter kept in the meta table (ids start at 1)."""
        raw = self.get(txn, "meta", counter)
        try:
            n = int(raw) if raw is not None else 1
        except ValueError:
            raise DamagedRecord(f"counter {counter.decode()} is malformed") from None
        self.put(txn, "meta", counter, str(n + 1).encode())
        return n

    # ---- locks ----

    @contextmanager
    def flock(self, name: str, exclusive: bool = False, wait: bool = True) -> Iterator[None]:
        """An advisory lock file in the store; StoreError when busy and not waiting."""
        try:
            fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open {self.path / name}: {e.strerror}") from None
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

    # ---- the reserve: space that lets rm and gc commit on a full disk ----

    def _reserve_size(self) -> int:
        st = os.statvfs(self.path)
        return max(RESERVE_MIN, min(RESERVE_MAX, st.f_blocks * st.f_frsize // 64))

    def ensure_reserve(self) -> None:
        """Preallocate the reserve file when it is missing and the disk has room for it."""
        path = self.path / RESERVE_NAME
        try:
            if path.exists():
                return
            size = self._reserve_size()
            st = os.statvfs(self.path)
            if st.f_bavail * st.f_frsize < 4 * size:
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                return
            os.close(fd)
        except OSError:
            pass

    def release_reserve(self) -> bool:
        """Give the reserve back to the filesystem (the disk is full); True when there was one."""
        try:
            os.unlink(self.path / RESERVE_NAME)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.EROFS:
                return False
            raise ZipfsError(f"cannot release the store's reserve: {e.strerror}") from None
