"""fsx on a writable zipfs mount: random I/O on one file, checked against an in-memory model.

The classic fsx (FreeBSD, xfstests) finds the bugs unit tests of a write path miss: the ones
that need a particular interleaving of writes past EOF, truncates that grow and shrink, shared
mmap writes and reads through the page cache, fsyncs and reopens. zipfs's write path has more
states than most (a working version, acknowledged bytes that are copied on write, queued and
ingesting versions, a file whose ingest commits while it is open), so this drives one file per
seed through all of them on a real mount in a child process: pwrite at random offsets and
lengths (holes past EOF), pread, ftruncate, mmap reads and MAP_SHARED writes (then msync or
munmap), fsync, close and reopen (sometimes with O_TRUNC; sometimes after waiting for the
background ingest to commit, or while a read-only descriptor keeps the file in use), pauses
with the file open so an ingest commits under a newer working version, and dropping the file's
cached pages (the writable mount keeps them across opens), so reads also come from the mount's
staged and stored bytes rather than the kernel's copy. Every read is compared with the model,
and fstat's size after every operation. At the end the mount drains its ingest queue (`zipfs
sync --wait`), every file must be stored with the model's bytes, and after the unmount `zipfs
verify` and `zipfs fsck` must pass.

ZIPFS_FSX_SEEDS (default 10: seeds 1..10) and ZIPFS_FSX_OPS (default 3000) size the run. A
failure names the seed, the operation and the last operations; ZIPFS_FSX_SEED=<seed>[,<seed>...]
runs just those seeds. The operations a seed does are the same every time; how they interleave
with the mount's background ingest is not, so a race may need a few runs to show again.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import time
from collections import deque
from contextlib import suppress
from pathlib import Path

from zipfs.fs.process import mounted, zipfs_cmd

#: fsx's defaults: files up to 256 KiB, operations up to 64 KiB
MAX_LEN = 256 << 10
MAX_OP_LEN = 64 << 10
#: how many operations a failure report shows
HISTORY = 20
PAGE = mmap.ALLOCATIONGRANULARITY
#: byte k of PATTERN is k % 255 + 1: never 0 (a hole), and an op's bytes name it (see data())
PATTERN = bytes(k % 255 + 1 for k in range(MAX_OP_LEN + 2 * 255))
STATES = ("staged", "ingesting", "stored")
#: relative weights of the operations
WEIGHTS = {"write": 24, "read": 22, "mapread": 10, "mapwrite": 10, "truncate": 10, "fsync": 6,
           "dropcache": 3, "reopen": 3, "burst": 1, "pause": 1}


def seeds() -> list[int]:
    if chosen := os.environ.get("ZIPFS_FSX_SEED", "").strip():
        return [int(s) for s in chosen.split(",") if s.strip()]
    return list(range(1, int(os.environ.get("ZIPFS_FSX_SEEDS", "10")) + 1))


def n_ops() -> int:
    return int(os.environ.get("ZIPFS_FSX_OPS", "3000"))


def data(n: int, off: int, length: int) -> bytes:
    """What op n writes at off: byte b at offset p means op n with n = b - 1 - p (mod 255)."""
    s = (off + n) % 255
    return PATTERN[s:s + length]


def first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        head = f"length {len(got)}, expected {len(want)}"
    else:
        head = "same length"
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            j = i
            while j < min(len(got), len(want)) and got[j] != want[j]:
                j += 1
            return (f"{head}; first difference at +{i:#x}: got {got[i:i + 8].hex()} expected "
                    f"{want[i:i + 8].hex()} ({j - i} bytes differ from there)")
    return head


class Fsx:
    """One seed's run: one file in the mount, its model, and the log of what was done to it."""

    def __init__(self, path: Path, seed: int, ops: int, mount_log: Path) -> None:
        self.path, self.seed, self.ops, self.mount_log = path, seed, ops, mount_log
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.history: deque[str] = deque(maxlen=HISTORY)
        self.n = -1
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        #: a read-only descriptor kept open across a close of the writer (the file stays in use)
        self.reader: int | None = None
        self.counts: dict[str, int] = dict.fromkeys(WEIGHTS, 0)
        #: the file's state at each reopen (how often a reopen raced an ingest, or followed one)
        self.reopened: dict[str, int] = dict.fromkeys(STATES, 0)

    # ---- reporting ----

    def fail(self, what: str) -> None:
        tail = self.mount_log.read_text(errors="replace")[-4000:] if self.mount_log.exists() else ""
        ops = "\n  ".join(self.history)
        raise AssertionError(f"fsx seed {self.seed}, op {self.n}: {what}\nlast operations:\n  {ops}\n"
                             f"replay: ZIPFS_FSX_SEED={self.seed} ZIPFS_FSX_OPS={self.n + 1}\n"
                             f"mount log (tail):\n{tail}")

    def note(self, text: str) -> None:
        self.history.append(f"{self.n}: {text}")

    def check_read(self, how: str, off: int, got: bytes, length: int) -> None:
        want = bytes(self.model[off:off + length])
        if got != want:
            self.fail(f"{how} at {off:#x} len {length:#x} (file size {len(self.model):#x}): "
                      f"{first_difference(got, want)}")

    def check_size(self) -> None:
        for name, fd in (("writer", self.fd), ("reader", self.reader)):
            if fd is not None and (size := os.fstat(fd).st_size) != len(self.model):
                self.fail(f"fstat of the {name} says size {size:#x}, expected {len(self.model):#x}")

    def check_all(self, fd: int, how: str) -> None:
        got = os.pread(fd, MAX_LEN + 4096, 0)
        self.check_read(how, 0, got, MAX_LEN + 4096)

    # ---- operations ----

    def range(self) -> tuple[int, int]:
        off = self.rng.randrange(MAX_LEN)
        return off, self.rng.randint(1, min(MAX_OP_LEN, MAX_LEN - off))

    def read_fd(self) -> tuple[str, int]:
        if self.reader is not None and self.rng.random() < 0.3:
            return "reader", self.reader
        return "writer", self.fd

    def op_write(self) -> None:
        off, length = self.range()
        buf = data(self.n, off, length)
        old = len(self.model)
        self.note(f"write {off:#x}+{length:#x} size {old:#x}->{max(old, off + length):#x}"
                  + (" (hole)" if off > old else ""))
        if (n := os.pwrite(self.fd, buf, off)) != length:
            self.fail(f"short write: {n} of {length}")
        if off > old:
            self.model.extend(bytes(off - old))
        self.model[off:off + length] = buf

    def op_read(self) -> None:
        size = len(self.model)
        off = self.rng.randrange(size + 1) if self.rng.random() < 0.1 else self.rng.randrange(max(size, 1))
        length = self.rng.randint(1, MAX_OP_LEN)
        who, fd = self.read_fd()
        self.note(f"read({who}) {off:#x}+{length:#x} size {size:#x}")
        self.check_read(f"pread({who})", off, os.pread(fd, length, off), length)

    def op_mapread(self) -> None:
        size = len(self.model)
        if size == 0:
            return self.note("mapread skipped (empty file)")
        off = self.rng.randrange(size)
        length = self.rng.randint(1, min(MAX_OP_LEN, size - off))
        pg = off - off % PAGE
        who, fd = self.read_fd()
        self.note(f"mapread({who}) {off:#x}+{length:#x} size {size:#x}")
        with mmap.mmap(fd, off + length - pg, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=pg) as m:
            got = m[off - pg:off + length - pg]
        self.check_read(f"mmap read({who})", off, got, length)

    def op_mapwrite(self) -> None:
        size = len(self.model)
        if size == 0:
            return self.note("mapwrite skipped (empty file)")
        off, length = self.range()
        end = off + length
        pg = off - off % PAGE
        sync = self.rng.random() < 0.5
        self.note(f"mapwrite {off:#x}+{length:#x} size {size:#x}->{max(size, end):#x} "
                  f"({'msync' if sync else 'munmap'})")
        if end > size:  # as fsx does: grow the file first, a page past EOF cannot be mapped
            os.ftruncate(self.fd, end)
            self.model.extend(bytes(end - size))
        buf = data(self.n, off, length)
        with mmap.mmap(self.fd, end - pg, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=pg) as m:
            m[off - pg:end - pg] = buf
            if sync:
                m.flush()
        self.model[off:end] = buf

    def op_truncate(self) -> None:
        size = self.rng.randrange(MAX_LEN + 1)
        self.note(f"truncate {len(self.model):#x}->{size:#x}")
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def op_dropcache(self) -> None:
        """Drop the file's clean cached pages, so the next reads come from the mount, not the
        kernel's page cache (which keeps them across opens on a writable mount)."""
        self.note("drop cached pages")
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def op_fsync(self) -> None:
        self.note("fsync")
        os.fsync(self.fd)

    def op_reopen(self) -> None:
        self.reopen(self.rng.choice(("none", "none", "sleep", "stored")))

    def op_burst(self) -> None:
        """Closes in quick succession, most after a write: a close while the previous version is
        still ingesting queues the new one, and the reopen right after takes it off the queue; a
        close with nothing written lets go of the file while its ingest reads it. The last reopen
        may wait, so the ingest commits under the reopened file."""
        rounds = self.rng.randint(2, 4)
        for i in range(rounds):
            if self.rng.random() < 0.7:
                self.op_write()
            self.reopen("none" if i < rounds - 1 else self.rng.choice(("none", "sleep", "stored")))
            self.check_size()

    def reopen(self, wait: str) -> None:
        """Close the writer (sometimes keeping a reader open), wait as told (none, sleep, or until
        the ingest is stored), reopen, sometimes with O_TRUNC."""
        rng = self.rng
        if self.reader is None and rng.random() < 0.3:
            self.reader = os.open(self.path, os.O_RDONLY)
        elif self.reader is not None and rng.random() < 0.5:
            fd, self.reader = self.reader, None
            os.close(fd)
        trunc, drop = rng.random() < 0.15, rng.random() < 0.5
        self.note(f"close, reopen{' O_TRUNC' if trunc else ''} (wait: {wait}, "
                  f"reader {'open' if self.reader is not None else 'closed'}"
                  f"{', drop cached pages' if drop else ''})")
        fd, self.fd = self.fd, -1
        os.close(fd)
        state = os.getxattr(self.path, "user.zipfs.state").decode()
        if state not in STATES:
            self.fail(f"after close the file's state is {state!r}")
        if wait == "sleep":
            time.sleep(rng.uniform(0.0, 0.05))
        elif wait == "stored":
            deadline = time.monotonic() + 30
            while (state := os.getxattr(self.path, "user.zipfs.state").decode()) != "stored":
                if state not in STATES:
                    self.fail(f"waiting for the ingest, the file's state is {state!r}")
                if time.monotonic() > deadline:
                    self.fail(f"the file is still {state!r} 30 s after its close")
                time.sleep(0.01)
        if os.stat(self.path).st_size != len(self.model):
            self.fail(f"stat after close says size {os.stat(self.path).st_size:#x}, "
                      f"expected {len(self.model):#x}")
        state = os.getxattr(self.path, "user.zipfs.state").decode()
        self.reopened[state] = self.reopened.get(state, 0) + 1
        self.fd = os.open(self.path, os.O_RDWR | (os.O_TRUNC if trunc else 0))
        if trunc:
            self.model.clear()
        if drop:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.check_all(self.fd, "full read after reopen")
        if self.reader is not None:
            self.check_all(self.reader, "full read through the reader after reopen")

    def op_pause(self) -> None:
        """With the file open: an ingest of a version closed earlier may commit meanwhile."""
        self.note("pause")
        time.sleep(self.rng.uniform(0.01, 0.1))

    # ---- the run ----

    def run(self) -> None:
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        for n in range(self.ops):
            self.n = n
            op = self.rng.choices(names, weights)[0]
            self.counts[op] += 1
            try:
                getattr(self, f"op_{op}")()
            except OSError as e:
                self.fail(f"{op} failed: {e!r}")
            self.check_size()
        self.n = self.ops
        self.note("close (end of run)")
        self.check_all(self.fd, "full read at the end")
        try:
            self.close()
        except OSError as e:
            self.fail(f"close failed: {e!r}")

    def close(self) -> None:
        """Close what is open (after a failure too: an open descriptor would keep the mount busy)."""
        fds = [fd for fd in (self.fd, self.reader) if fd is not None and fd >= 0]
        self.fd, self.reader = -1, None
        for fd in fds:
            os.close(fd)


def run_cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(zipfs_cmd(store, *args), capture_output=True, text=True, timeout=300)


def test_fsx_random_io_matches_the_model(tmp_path: Path) -> None:
    store, m, log = tmp_path / "store", tmp_path / "m", tmp_path / "mount.log"
    models: dict[Path, bytes] = {}
    started = time.monotonic()
    with mounted(store, m, log=log) as proc:
        for seed in seeds():
            fsx = Fsx(m / f"fsx-{seed}.bin", seed, n_ops(), log)
            try:
                fsx.run()
            finally:
                with suppress(OSError):  # only after a failure is anything still open
                    fsx.close()
            models[fsx.path] = bytes(fsx.model)
            assert proc.poll() is None, f"the mount died during seed {seed}: {log.read_text()[-4000:]}"
            print(f"fsx seed {seed}: {fsx.ops} ops {fsx.counts}, reopened when {fsx.reopened}, "
                  f"final size {len(fsx.model):#x}, {time.monotonic() - started:.1f} s so far")
        r = run_cli(store, "sync", "--wait", "--timeout", "120", str(m))
        assert r.returncode == 0, f"zipfs sync: {r.stdout}{r.stderr}\n{log.read_text()[-4000:]}"
        for path, want in models.items():
            got = path.read_bytes()
            assert got == want, f"{path.name} after sync: {first_difference(got, want)}"
            assert os.getxattr(path, "user.zipfs.state") == b"stored", path.name
        assert proc.poll() is None, f"the mount died: {log.read_text()[-4000:]}"
    assert not os.path.ismount(m)
    for cmd in ("verify", "fsck"):
        r = run_cli(store, cmd)
        assert r.returncode == 0, f"zipfs {cmd}: {r.stdout}{r.stderr}"
    print(f"fsx: {len(models)} seeds x {n_ops()} ops in {time.monotonic() - started:.1f} s")
