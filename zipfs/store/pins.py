"""Pins: the inodes a process is reading, so that gc in any process keeps their file versions.

POSIX lets an open file be read after its name is removed or replaced. In a store, removing or
replacing a name turns the file version it held into an orphan (zipfs.store.inodes); gc frees
an orphan only when no live process pins its inode. Each reading process (a mount) owns one
file under STORE/pins/, holds an exclusive flock on it for its lifetime, and appends a record
when an inode gets its first pin ('+' and the number) or loses its last ('-'). A pin is written
before the inode's record is read, and gc reads the pins inside its own write transaction,
after whatever change orphaned a version: so a version an open handle reads is always seen
pinned. A process that dies releases its flock, and its file then counts for nothing (the next
reader deletes it). No fsync: pins need not outlive their process.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import struct
import threading
from collections import Counter
from pathlib import Path

from zipfs.errors import StoreError

PIN_DIR = "pins"
_REC = struct.Struct(">cQ")
#: rewrite a pin log when it holds this many more records than live pins
COMPACT_SLACK = 4096


def _dir(store_path: Path) -> Path:
    d = store_path / PIN_DIR
    d.mkdir(mode=0o700, exist_ok=True)
    return d


class Pins:
    """This process's pins. Thread-safe."""

    def __init__(self, store_path: Path) -> None:
        self._dir = _dir(store_path)
        self.path = self._dir / f"{os.getpid()}-{secrets.token_hex(6)}"
        self._counts: Counter[int] = Counter()
        self._records = 0
        self._lock = threading.Lock()
        self._fd = self._new_file([])

    def _new_file(self, live: list[int]) -> int:
        """A locked pin file holding live, put in place atomically (a reader never sees an
        unlocked file of a live process)."""
        tmp = self._dir / f".{self.path.name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"".join(_REC.pack(b"+", ino) for ino in live))
            os.replace(tmp, self.path)
        except OSError as e:
            raise StoreError(f"cannot write pins in {self._dir}: {e.strerror}") from None
        self._records = len(live)
        return fd

    def pin(self, ino: int) -> None:
        with self._lock:
            self._counts[ino] += 1
            if self._counts[ino] == 1:
                self._append(b"+", ino)

    def unpin(self, ino: int) -> None:
        with self._lock:
            self._counts[ino] -= 1
            if self._counts[ino] > 0:
                return
            del self._counts[ino]
            if self._records > len(self._counts) + COMPACT_SLACK:
                old, self._fd = self._fd, self._new_file(sorted(self._counts))
                os.close(old)
            else:
                self._append(b"-", ino)

    def _append(self, op: bytes, ino: int) -> None:
        try:
            os.write(self._fd, _REC.pack(op, ino))
        except OSError as e:
            raise StoreError(f"cannot write pins: {e.strerror}") from None
        self._records += 1

    def __contains__(self, ino: int) -> bool:
        return ino in self._counts

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self.path.unlink(missing_ok=True)
                os.close(self._fd)
                self._fd = -1


def _replay(data: bytes) -> set[int]:
    live: Counter[int] = Counter()
    for i in range(0, len(data) - len(data) % _REC.size, _REC.size):
        op, ino = _REC.unpack_from(data, i)
        live[ino] += 1 if op == b"+" else -1
    return {ino for ino, n in live.items() if n > 0}


def live(store_path: Path) -> set[int]:
    """Every inode pinned by a live process. Files of dead processes are deleted on the way."""
    out: set[int] = set()
    d = _dir(store_path)
    for f in d.iterdir():
        if f.name.startswith("."):
            continue
        try:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its owner holds it: alive
                out |= _replay(os.pread(fd, os.fstat(fd).st_size, 0))
                continue
            if os.path.exists(f) and os.stat(f).st_ino == os.fstat(fd).st_ino:
                f.unlink(missing_ok=True)  # its owner is gone
        finally:
            os.close(fd)
    return out
