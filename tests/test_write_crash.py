"""Crash safety of the writable mount: SIGKILL at random moments, remount, check every byte.

The promise is "nothing acknowledged is lost": a write is acknowledged when the close(), fsync()
or truncate(path) that covers it returned success (a rename or unlink when it returned), and
after a SIGKILL of the mount process at any moment every file is exactly its newest version
acknowledged before the kill. What this test proves, over ZIPFS_CRASH_ITERATIONS (default 50)
kills and real model data (safetensors layers of two models, a tokenizer, a config):

- Files already acknowledged, stored ones (ingested by the CLI, or by background ingest) and
  staged ones (closed through the mount, not yet ingested), are rewritten in every way a user
  rewrites a file: open(O_TRUNC) and new content, open(r+) and patches in the middle,
  truncate(path) and ftruncate to a shorter and to a longer size, append (O_APPEND), a new file
  renamed over them; new files are created directly or downloader-style (`x.incomplete`, then
  a rename). Some writes are followed by an fsync (also in the middle of a file's content,
  which acknowledges that prefix), all are closed.
  Now and then a second writer shares the file, or a reader holds it open meanwhile.
- The mount dies by ZIPFS_FAULT at a fault point (mid-write, after the staging fsync, after the
  journal commit, at release, mid-ingest, inside the ingest's commit, after it), by a SIGKILL
  from the test between two system calls (mid-write over an acknowledged file included), or by
  a SIGKILL from a timer thread at a random moment. Every fourth crash, the next mount is
  killed too, as it starts (its staging recovery, or its ingest of what it recovered).
- After each kill a clean remount shows exactly the acknowledged files and nothing else, each
  byte-exact to its newest acknowledged version. For the one acknowledging call in flight when
  the mount died (a close, fsync, truncate or rename that did not return) the whole file set is
  either as before that call or as after it: no mixture, no truncated prefix, no empty file
  unless empty was acknowledged, and a file created but never successfully closed is not there.
  A kill between two system calls leaves no call in flight: the check is then exact.
- While the mount lives, a file read back shows what was written, also through a descriptor
  opened before the change (every handle sees writes), and a descriptor open on a file renamed
  over or removed still reads its old bytes (POSIX).
- At the end `zipfs sync --wait` ingests everything: every file is stored and exact, and
  `zipfs verify` and `zipfs fsck` pass.

For every path the model keeps the size and sha256 of each acknowledged version in order (to
name what a wrong file is, should one be found) and the bytes of the newest one. Each fault
point is chosen in turn and its count n is small enough that the operations of the iteration
reach it: the iteration keeps operating until the mount dies, and a point that was not reached
is retried with n = 1 in its next turn, so that enough of them fire.

A mount process that does not exit after its SIGKILL, or a system call that waits forever on a
mount nobody serves, fails the test (its FUSE connection is aborted, so nothing is left hanging).

The last tests are minimal reproductions: of what the random one found (a reader of a staged
file whose name went, a fine-tune whose base model was removed, a mount killed as it starts
serving that never exits) and of what reading the recovery code found (an empty file made by
mknod, removed by the recovery of a crash during its first write).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from safetensors.numpy import save

from zipfs.fs.process import ROOT, mounted, wait_for, zipfs_cmd

ITERATIONS = int(os.environ.get("ZIPFS_CRASH_ITERATIONS", "50"))
SEED = int(os.environ.get("ZIPFS_CRASH_SEED", "20261123"))
POINTS = ("write", "fsync", "journal", "release", "ingest-chunk", "ingest-commit", "ingest-committed")
#: ZIPFS_FAULT=point:n draws n from 1..N_MAX[point]: far enough to land inside an operation on an
#: acknowledged file, near enough that the operations of one iteration reach it
N_MAX = {"write": 12, "fsync": 4, "journal": 4, "release": 4, "ingest-chunk": 5, "ingest-commit": 2,
         "ingest-committed": 2}
LAYER = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight",
         "encoder.layer.0.attention.self.value.weight", "encoder.layer.0.attention.output.dense.weight")
DIRS = ("d0", "d1", "d2", "d3")
#: operations an iteration runs at most (it stops earlier when the mount dies)
MAX_OPS = 14
MAX_FILES = 14
MAX_SIZE = 4 << 20
#: seconds a SIGKILLed mount process may take to exit; an iteration's operations may take
EXIT_TIMEOUT, HANG_TIMEOUT = 20, 120
#: sizes of the pieces a content is written in (one write() each)
PIECES = (4096, 65536, 100_000, 131072, 262144, 262144, 1 << 20)

Change = dict[str, bytes | None]  # path -> its new content, None: the path goes away


def layer_file(model_dir: Path) -> bytes:
    """A small real safetensors file: four 384x384 F32 matrices of one layer (2.4 MB, 3 chunks)."""
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return save({name: f.get_tensor(name) for name in LAYER})


def digest(data: bytes) -> str:
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"


def resized(data: bytes | bytearray, n: int) -> bytes:
    return bytes(data[:n]) + b"\0" * (n - len(data))


def splice(buf: bytearray, off: int, piece: bytes) -> None:
    """What a write of piece at off does to a file holding buf."""
    if off > len(buf):
        buf.extend(b"\0" * (off - len(buf)))
    buf[off:off + len(piece)] = piece


def visible_files(root: Path) -> dict[str, Path]:
    """Every regular file under root, hidden ones included, by path relative to root."""
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            p = Path(d) / name
            if p.is_file():
                out[str(p.relative_to(root))] = p
    return out


def read_at(fd: int, off: int, n: int = 1 << 40) -> bytes:
    """n bytes at off (or all of them to the end), however the reads are cut."""
    parts = []
    while n and (part := os.pread(fd, min(n, 4 << 20), off)):
        parts.append(part)
        off, n = off + len(part), n - len(part)
    return b"".join(parts)


def in_mount_table(mnt: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def unmount_dead(mnt: Path) -> None:
    """Unmount a mount whose process is dead (os.path.ismount may not see it: ENOTCONN)."""
    for flags in ("-u", "-uz"):
        if not in_mount_table(mnt):
            return
        subprocess.run(["fusermount3", flags, str(mnt)], capture_output=True)
    assert not in_mount_table(mnt), f"cannot unmount {mnt}"


@dataclass
class Acked:
    """A path's acknowledged versions: size and sha256 of each, oldest first; the newest's bytes."""

    data: bytes
    history: list[str] = field(default_factory=list)


class Files:
    """What the mount acknowledged: every visible path and its versions."""

    def __init__(self) -> None:
        self.acked: dict[str, Acked] = {}
        self.removed: set[str] = set()

    def apply(self, change: Change) -> None:
        for path, data in change.items():
            if data is None:
                if self.acked.pop(path, None) is not None:
                    self.removed.add(path)
                continue
            a = self.acked.setdefault(path, Acked(data))
            a.data = data
            a.history.append(digest(data))

    def world(self, change: Change | None = None) -> dict[str, bytes]:
        """The files as they are, or as they would be after change."""
        out = {p: a.data for p, a in self.acked.items()}
        for path, data in (change or {}).items():
            if data is None:
                out.pop(path, None)
            else:
                out[path] = data
        return out

    def explain(self, path: str, got: bytes, inflight: bytes | None) -> str:
        """Name what a file that is not as expected holds."""
        a = self.acked.get(path)
        d = digest(got)
        if a is not None and d == a.history[-1]:
            return "its newest acknowledged version"
        if inflight is not None and got == inflight:
            return "the version in flight"
        if a is not None and d in a.history:
            i = a.history.index(d)
            return f"its acknowledged version {i + 1} of {len(a.history)} (an older one)"
        if not got:
            return "empty"
        refs = (("newest acknowledged version", a.data if a else None), ("version in flight", inflight))
        for what, ref in refs:
            if ref is not None and ref.startswith(got):
                return f"a prefix ({len(got)} of {len(ref)} bytes) of the {what}"
        if a is not None:
            at = next((i for i, (x, y) in enumerate(zip(got, a.data, strict=False)) if x != y),
                      min(len(got), len(a.data)))
            return f"{len(got)} bytes, first differing from the newest acknowledged version at byte {at}"
        return f"{len(got)} bytes never written to it"


@dataclass
class Inflight:
    """An acknowledging call that was made and had not returned: it may or may not have landed."""

    what: str
    change: Change


class Killed(Exception):
    """The test killed the mount between two system calls."""


def mount_dev(mnt: Path) -> str | None:
    """major:minor of the mount at mnt, from the mount table (no request to the mount)."""
    with open("/proc/self/mountinfo") as f:
        return next((p[2] for p in map(str.split, f) if p[4] == str(mnt)), None)


def abort_connection(mnt: Path) -> None:
    """Abort the FUSE connection of mnt: every request waiting on it fails, and a mount process that
    cannot exit (a thread of it waits on its own mount) can."""
    dev = mount_dev(mnt)
    conns = Path("/sys/fs/fuse/connections")
    if dev is None:
        return
    ours = not (conns / dev.split(":")[1]).exists()  # fusectl is not mounted: mount it for this
    if ours:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conns)], capture_output=True)
    try:
        (conns / dev.split(":")[1] / "abort").write_text("1")
    finally:
        if ours:
            subprocess.run(["umount", str(conns)], capture_output=True)


def threads_of(pid: int) -> str:
    """The threads of a process, each with what it waits on in the kernel."""
    out = []
    try:
        tasks = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError:
        return "none (it is gone)"
    for t in tasks:
        task = Path(f"/proc/{pid}/task/{t}")
        try:
            lines = task.joinpath("stack").read_text().splitlines()
            stack = [line.split("] ")[-1].split("+")[0] for line in lines]
            out.append(f"{task.joinpath('comm').read_text().strip()!r} ({' < '.join(stack[:4]) or 'exited'})")
        except OSError:
            pass
    return ", ".join(out)


def zombie(pid: int) -> bool:
    """Whether process pid died but is not reaped (or cannot be: a thread of it is still in the kernel)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return False


def kill(proc: subprocess.Popen, mnt: Path) -> None:
    """SIGKILL the mount process and reap it. One that does not exit fails the test (after its FUSE
    connection is aborted, so that it does and nothing is left hanging)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        threads = threads_of(proc.pid)
        abort_connection(mnt)
        proc.wait(timeout=EXIT_TIMEOUT)
        raise AssertionError(f"the mount process did not exit {EXIT_TIMEOUT} s after SIGKILL (its mount "
                             f"hung; its FUSE connection was aborted): threads {threads}") from None


class Watchdog:
    """A system call on a mount whose process is gone but whose connection lives on waits forever:
    after `seconds` this aborts the connection (the call fails) and notes why, so that the test
    fails instead of hanging."""

    def __init__(self, proc: subprocess.Popen, mnt: Path, seconds: float) -> None:
        self.proc, self.mnt = proc, mnt
        self.fired = ""
        self.timer = threading.Timer(seconds, self.fire)
        self.timer.daemon = True

    def fire(self) -> None:
        self.fired = f"the mount hung (its FUSE connection was aborted): threads {threads_of(self.proc.pid)}"
        abort_connection(self.mnt)

    def __enter__(self) -> Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


class Driver:
    """Runs random operations on the mount of one iteration, as a user would, and keeps Files up to
    date: a call that acknowledges changes Files once it returned; while it runs it is in flight."""

    def __init__(self, m: Path, proc: subprocess.Popen, files: Files, payloads: dict[str, bytes],
                 rng: random.Random, serial: Iterator[int], coverage: Counter[tuple[str, str]],
                 kill_at: int | None = None) -> None:
        self.m, self.proc, self.files, self.payloads, self.rng = m, proc, files, payloads, rng
        self.serial, self.coverage, self.kill_at = serial, coverage, kill_at
        self.steps = 0
        self.inflight: Inflight | None = None
        self.fds: list[int] = []
        self.trail: list[str] = []
        self.killed_by_test = False
        self.acks = 0
        #: the file the last operation changed (the next one may change it again)
        self.last: str | None = None
        #: the operation under way, and the state of its file
        self.current: tuple[str, str] | None = None

    # ---- system calls ----

    def step(self, what: str) -> None:
        self.steps += 1
        self.trail.append(f"    {self.steps}: {what}")
        if self.steps == self.kill_at:
            self.killed_by_test = True
            kill(self.proc, self.m)
            raise Killed(f"killed from outside before step {self.steps} ({what})")

    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A system call that acknowledges nothing."""
        self.step(what)
        return fn(*args)

    def ack(self, what: str, change: Change, fn: Callable[..., Any], *args: Any, closes: int = -1) -> Any:
        """A system call whose success acknowledges change."""
        self.step(what)
        self.inflight = Inflight(what, change)
        if closes >= 0:
            self.fds.remove(closes)  # a close that fails closes the descriptor all the same
        out = fn(*args)
        self.inflight = None
        self.files.apply(change)
        self.acks += 1
        return out

    def open(self, rel: str, flags: int) -> int:
        fd = self.call(f"open {rel} {flags:#o}", os.open, self.m / rel, flags | os.O_CLOEXEC, 0o644)
        self.fds.append(fd)
        return fd

    def close(self, fd: int, rel: str, shown: bytearray) -> None:
        self.ack(f"close {rel} ({len(shown)} bytes)", {rel: bytes(shown)}, os.close, fd, closes=fd)

    def fsync(self, fd: int, rel: str, shown: bytearray) -> None:
        self.ack(f"fsync {rel} ({len(shown)} bytes)", {rel: bytes(shown)}, os.fsync, fd)

    def write_all(self, fd: int, rel: str, shown: bytearray, data: bytes, off: int | None) -> None:
        """Write data at off (None: an O_APPEND descriptor, at the end) in pieces of random sizes,
        now and then an fsync in the middle."""
        pos = 0
        while pos < len(data):
            piece = data[pos:pos + self.rng.choice(PIECES)]
            at = len(shown) if off is None else off + pos
            if off is None:
                n = self.call(f"write {len(piece)} (append at {at})", os.write, fd, piece)
            else:
                n = self.call(f"pwrite {len(piece)} at {at}", os.pwrite, fd, piece, at)
            assert n > 0, f"{rel}: write returned {n}"
            splice(shown, at, piece[:n])
            pos += n
            if pos < len(data) and self.rng.random() < 0.1:
                self.fsync(fd, rel, shown)

    def write_new(self, rel: str, flags: int, data: bytes, p_fsync: float) -> None:
        """Open rel with flags, write data in pieces, fsync with probability p_fsync, close."""
        fd = self.open(rel, os.O_WRONLY | os.O_CREAT | flags)
        shown = bytearray()
        self.write_all(fd, rel, shown, data, 0)
        if self.rng.random() < p_fsync:
            self.fsync(fd, rel, shown)
        self.close(fd, rel, shown)

    def close_fds(self) -> None:
        """Close what an interrupted operation left open (the mount is dead: nothing is acknowledged)."""
        assert self.proc.poll() is not None
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    # ---- content, all of it real data ----

    def content(self, old: bytes | None) -> tuple[bytes, str]:
        """New content for a file that holds old: a payload, a slice of one, or a fine-tune of old
        (a stretch of it replaced by the same stretch of another model's layer)."""
        rng = self.rng
        for _ in range(4):
            r = rng.random()
            if old is not None and len(old) > 65536 and r < 0.3:
                src = self.payloads[rng.choice(["layer-minilm", "layer-sre"])]
                lo = rng.randrange(len(old) // 8, len(old) // 2)
                hi = min(len(old), len(src), lo + rng.randint(4096, 1 << 20))
                data, what = old[:lo] + src[lo:hi] + old[hi:], f"fine-tune of the old content [{lo}:{hi}]"
            elif r < 0.04:
                data, what = b"", "empty"
            elif r < 0.75:
                name = rng.choice(["layer-sre", "layer-minilm", "layer-sre", "layer-minilm", "tokenizer",
                                   "config"])
                data, what = self.payloads[name], name
            else:
                name = rng.choice(list(self.payloads))
                src = self.payloads[name]
                lo = rng.randrange(len(src))
                data, what = src[lo:lo + rng.randint(1, 1 << 20)], f"{name}[{lo}:+]"
            if data != old:
                break
        return data, what

    def piece(self, n: int) -> bytes:
        src = self.payloads[self.rng.choice(list(self.payloads))]
        lo = self.rng.randrange(max(1, len(src) - n))
        return src[lo:lo + n]

    # ---- choosing what to change ----

    def state(self, rel: str) -> str:
        return os.getxattr(self.m / rel, "user.zipfs.state").decode()

    def target(self, want: str) -> tuple[str, str]:
        """An acknowledged file, stored or staged as wanted when there is one; and its state."""
        paths = sorted(self.files.acked)
        self.rng.shuffle(paths)
        st = ""
        for p in paths:
            st = self.state(p)
            if (st == "stored") == (want == "stored"):
                return p, st
        return paths[-1], st

    def new_name(self, d: str, data: bytes) -> str:
        ext = ".safetensors" if data[8:9] == b"{" else ".json" if data[:1] == b"{" else ".bin"
        return f"{d}/f{next(self.serial)}{ext}"

    def random_op(self) -> None:
        rng = self.rng
        n = len(self.files.acked)
        ops: list[tuple[str, float]] = [("create", 3.0 if n < 6 else 1.0 if n < MAX_FILES else 0.0)]
        if n:
            ops += [("overwrite", 2.0), ("patch", 2.0), ("truncate", 1.0), ("ftruncate", 1.0),
                    ("append", 1.0), ("rename-over", 1.0), ("unlink", 0.3 if n > MAX_FILES // 2 else 0.0)]
        op = rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        if op == "create":
            self.op_create()
            self.current = None
            return
        if self.last in self.files.acked and rng.random() < 0.4:  # again: it is staged or being ingested
            rel, st = self.last, self.state(self.last)
        else:
            rel, st = self.target(rng.choice(["stored", "staged"]))
        self.last = rel
        old = self.files.acked[rel].data
        if op in ("append", "truncate", "ftruncate") and len(old) > MAX_SIZE:
            op = "overwrite"
        reader = self.open(rel, os.O_RDONLY) if rng.random() < 0.2 else -1
        if reader >= 0:
            self.trail.append(f"  (a reader holds {rel} open meanwhile)")
        getattr(self, "op_" + op.replace("-", "_"))(rel, st, old)
        if reader >= 0:  # it shares what the file shows now; a file renamed over or removed, its old bytes
            want = old if op in ("rename-over", "unlink") else self.files.acked[rel].data
            got = self.call(f"read {rel} through the reader", read_at, reader, 0)
            self.fds.remove(reader)
            os.close(reader)
            assert got == want, (f"{rel} read through a descriptor open during {op} is "
                                 f"{self.files.explain(rel, got, None)} ({self.where()})")
        self.current = None

    def begin(self, op: str, what: str, st: str = "") -> None:
        """An operation starts: count it by the state of the file it changes, and note it down."""
        self.coverage[(op, st)] += 1
        self.current = (op, st)
        self.trail.append(f"  {what}" + (f" (it is {st})" if st else ""))

    # ---- operations ----

    def op_create(self) -> None:
        data, what = self.content(None)
        final = self.new_name(self.rng.choice(DIRS), data)
        via_rename = self.rng.random() < 0.4
        rel = final + ".incomplete" if via_rename else final
        self.begin("create", f"create {rel}: {what}")
        self.last = final
        self.write_new(rel, os.O_TRUNC, data, 0.3)
        if via_rename:
            self.ack(f"rename {rel} {final}", {rel: None, final: data}, os.rename, self.m / rel,
                     self.m / final)
        self.readback(final)

    def op_overwrite(self, rel: str, st: str, old: bytes) -> None:
        data, what = self.content(old)
        self.begin("overwrite", f"overwrite {rel} with O_TRUNC: {what}", st)
        fd = self.open(rel, os.O_WRONLY | os.O_TRUNC)
        shown = bytearray()
        self.write_all(fd, rel, shown, data, 0)
        if self.rng.random() < 0.3:
            self.fsync(fd, rel, shown)
        self.close(fd, rel, shown)
        self.readback(rel)

    def op_patch(self, rel: str, st: str, old: bytes) -> None:
        self.begin("patch", f"patch {rel} in place (r+)", st)
        fd = self.open(rel, os.O_RDWR)
        shown = bytearray(old)  # every descriptor of the file shows the same bytes
        if self.rng.random() < 0.2:  # a second writer: the first close acknowledges its writes too
            fd2 = self.open(rel, os.O_RDWR)
            self.write_all(fd2, rel, shown, self.piece(self.rng.randint(1, 100_000)),
                           self.rng.randrange(len(shown) + 1))
            if self.rng.random() < 0.5:
                self.close(fd2, rel, shown)
            else:
                fd, fd2 = fd2, fd
                self.close(fd2, rel, shown)
        for i in range(self.rng.randint(1, 3)):
            if i and self.rng.random() < 0.3:  # and the next patch changes acknowledged bytes again
                self.fsync(fd, rel, shown)
            size = len(shown)
            off = self.rng.randint(size // 4, max(size // 4, 3 * size // 4))
            piece = self.piece(self.rng.randint(1, max(1, min(300_000, size - off))))
            if bytes(shown[off:off + len(piece)]) == piece:
                piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
            self.write_all(fd, rel, shown, piece, off)
            if self.rng.random() < 0.5:
                got = self.call(f"pread {len(piece)} at {off}", read_at, fd, off, len(piece))
                assert got == piece, f"{rel}: a read after a patch does not show it ({self.where()})"
        if self.rng.random() < 0.3:
            self.fsync(fd, rel, shown)
        self.close(fd, rel, shown)
        self.readback(rel)

    def new_size(self, size: int) -> tuple[int, str]:
        if size and (size > MAX_SIZE // 2 or self.rng.random() < 0.5):
            return self.rng.randint(0 if self.rng.random() < 0.05 else 1, size - 1) if size > 1 else 0, \
                "shorter"
        return size + self.rng.randint(1, 1_500_000), "longer"

    def op_truncate(self, rel: str, st: str, old: bytes) -> None:
        n, how = self.new_size(len(old))
        self.begin(f"truncate {how}", f"truncate({rel}, {n}) by path, {how} than {len(old)}", st)
        self.ack(f"truncate {rel} {n}", {rel: resized(old, n)}, os.truncate, self.m / rel, n)
        self.readback(rel)

    def op_ftruncate(self, rel: str, st: str, old: bytes) -> None:
        n, how = self.new_size(len(old))
        self.begin(f"ftruncate {how}", f"ftruncate {rel} to {n}, {how} than {len(old)}", st)
        fd = self.open(rel, os.O_RDWR)
        shown = bytearray(old)
        self.call(f"ftruncate {n}", os.ftruncate, fd, n)
        del shown[n:]
        shown.extend(b"\0" * (n - len(shown)))
        if self.rng.random() < 0.4:  # and write a tail, as a writer rewriting the end does
            self.write_all(fd, rel, shown, self.piece(self.rng.randint(1, 200_000)), n)
        if self.rng.random() < 0.4:
            self.fsync(fd, rel, shown)
        self.close(fd, rel, shown)
        self.readback(rel)

    def op_append(self, rel: str, st: str, old: bytes) -> None:
        data = self.piece(self.rng.randint(1, 1 << 20))
        self.begin("append", f"append {len(data)} bytes to {rel}", st)
        fd = self.open(rel, os.O_WRONLY | os.O_APPEND)
        shown = bytearray(old)
        self.write_all(fd, rel, shown, data, None)
        if self.rng.random() < 0.3:
            self.fsync(fd, rel, shown)
        self.close(fd, rel, shown)
        self.readback(rel)

    def op_rename_over(self, rel: str, st: str, old: bytes) -> None:
        data, what = self.content(old)
        d, _, name = rel.rpartition("/")
        tmp = f"{d}/.{name}.{next(self.serial)}.tmp"
        self.begin("rename-over", f"write {tmp} ({what}) and rename it over {rel}", st)
        self.write_new(tmp, os.O_EXCL, data, 0.5)
        self.ack(f"rename {tmp} {rel}", {tmp: None, rel: data}, os.rename, self.m / tmp, self.m / rel)
        self.readback(rel)

    def op_unlink(self, rel: str, st: str, old: bytes) -> None:
        self.begin("unlink", f"unlink {rel}", st)
        self.ack(f"unlink {rel}", {rel: None}, os.unlink, self.m / rel)

    def readback(self, rel: str) -> None:
        """Now and then read a file back through a new descriptor: it shows what was acknowledged."""
        if self.rng.random() >= 0.25:
            return
        fd = self.open(rel, os.O_RDONLY)
        want = self.files.acked[rel].data
        got = self.call(f"read {rel}", read_at, fd, 0)
        self.fds.remove(fd)
        os.close(fd)
        assert got == want, (f"{rel} read back while mounted is {self.files.explain(rel, got, None)}, "
                             f"not what was written ({self.where()})")

    def where(self) -> str:
        return "\n".join(["operations:", *self.trail[-80:]])


@contextmanager
def crash_mount(store: Path, mnt: Path, log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A mount that may die at any moment, even before it is seen mounted; never left behind."""
    mnt.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".out"), "wb") as out:
        proc = subprocess.Popen(zipfs_cmd(store, "mount", str(mnt), "--foreground", "--log-file", str(log)),
                                env=dict(os.environ, PYTHONPATH=str(ROOT), **env), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: in_mount_table(mnt) or proc.poll() is not None, 30, "the mount")
        if not in_mount_table(mnt):
            raise AssertionError(f"the mount process exited ({proc.returncode}) before mounting: "
                                 f"{log.read_text() if log.exists() else ''}")
        yield proc
    finally:
        try:
            kill(proc, mnt)
        finally:
            unmount_dead(mnt)


def seed_store(store: Path, payloads: dict[str, bytes], tmp: Path) -> dict[str, bytes]:
    """Files ingested with the CLI before any mount: the stored files the mounts rewrite."""
    src = tmp / "seed"
    src.mkdir()
    names = {"layer.safetensors": "layer-minilm", "tuned.safetensors": "layer-sre",
             "tokenizer.json": "tokenizer", "config.json": "config"}
    for name, payload in names.items():
        (src / name).write_bytes(payloads[payload])
    r = subprocess.run(zipfs_cmd(store, "ingest", str(src), "--name", "stored"), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return {f"stored/{name}": payloads[payload] for name, payload in names.items()}


def kill_plan(iterations: int, rng: random.Random) -> list[str]:
    """How each iteration's mount dies: 5 of every 9 by a fault point (each point in turn), 2 by
    the test between two system calls, 2 by a timer thread."""
    points = list(POINTS)
    rng.shuffle(points)
    out, k = [], 0
    for it in range(iterations):
        r = it % 9
        if r in (2, 6):
            out.append("step")
        elif r in (4, 8):
            out.append("timer")
        else:
            out.append(points[k % len(points)])
            k += 1
    return out


def check(m: Path, files: Files, inflight: Inflight | None, it: int, how: str, drv: Driver,
          logs: list[Path]) -> bool:
    """After a kill: the files are exactly the acknowledged ones, or, when a call was in flight,
    exactly as after it. True when the call in flight landed."""
    seen = visible_files(m)
    worlds = [("before the call in flight" if inflight else "acknowledged", files.world())]
    if inflight is not None:
        worlds.append(("after the call in flight", files.world(inflight.change)))
    problems: dict[str, list[str]] = {}
    got = {p: seen[p].read_bytes() for p in seen}
    for name, world in worlds:
        bad = []
        for path in sorted(set(world) | set(got)):
            inflight_data = inflight.change.get(path) if inflight else None
            if path not in got:
                versions = files.acked[path].history if path in files.acked else "in flight"
                bad.append(f"{path}: missing (acknowledged: {versions})")
            elif path not in world:
                gone = " (it was removed)" if path in files.removed else ""
                bad.append(f"{path}: should not be there{gone}: it is "
                           f"{files.explain(path, got[path], inflight_data)}")
            elif got[path] != world[path]:
                bad.append(f"{path}: is {files.explain(path, got[path], inflight_data)}; expected "
                           f"{digest(world[path])}")
        if not bad:
            return name.startswith("after")
        problems[name] = bad
    lines = [f"iteration {it} ({how}): after the remount the files are neither as acknowledged"
             + (f" nor as after the call in flight ({inflight.what})" if inflight else "")]
    for name, bad in problems.items():
        lines += [f"  compared with the files {name}:", *(f"    {b}" for b in bad)]
    lines += [drv.where(), "logs: " + " ".join(map(str, logs))]
    raise AssertionError("\n".join(lines))


@pytest.fixture(scope="module")
def payloads(models) -> dict[str, bytes]:
    tok = (models["sre"] / "tokenizer.json").read_bytes()
    return {"layer-sre": layer_file(models["sre"]), "layer-minilm": layer_file(models["minilm"]),
            "tokenizer": tok[:300_000], "config": (models["sre"] / "config.json").read_bytes()}


@dataclass
class Tally:
    """What the iterations did, to print and to check that they did what this test claims."""

    fired: Counter[str] = field(default_factory=Counter)
    moments: Counter[str] = field(default_factory=Counter)
    during: Counter[tuple[str, str]] = field(default_factory=Counter)
    coverage: Counter[tuple[str, str]] = field(default_factory=Counter)
    restarts: Counter[str] = field(default_factory=Counter)
    landed: int = 0
    retry: set[str] = field(default_factory=set)


def crash(it: int, how: str, store: Path, m: Path, files: Files, payloads: dict[str, bytes],
          serial: Iterator[int], tally: Tally, logs: Path) -> tuple[Driver, str]:
    """One mount that dies as `how` says while operations run on it; the Driver that ran them."""
    rng = random.Random(f"{SEED}/{it}")
    env: dict[str, str] = {}
    kill_at = timer_at = None
    point = how if how in POINTS else ""
    if point:
        n = 1 if point in tally.retry else rng.randint(1, N_MAX[point])
        tally.retry.discard(point)
        env = {"ZIPFS_FAULT": f"{point}:{n}"}
        how = f"{point}:{n}"
    elif how == "step":
        kill_at = rng.randint(1, 60)
        how = f"killed before call {kill_at}"
    else:
        timer_at = rng.uniform(0.05, 1.2)
        how = f"killed by a timer after {timer_at:.2f} s"
    log = logs / f"crash{it}.log"
    with crash_mount(store, m, log, env) as proc, Watchdog(proc, m, HANG_TIMEOUT) as dog:
        drv = Driver(m, proc, files, payloads, rng, serial, tally.coverage, kill_at=kill_at)
        timer = None
        if timer_at is not None:
            def shoot() -> None:
                drv.killed_by_test = True
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            timer = threading.Timer(timer_at, shoot)
            timer.start()
        error: OSError | None = None
        try:
            for _ in range(MAX_OPS if point else 60):
                drv.random_op()
        except Killed:
            pass
        except OSError as e:
            error = e
        assert not dog.fired, f"iteration {it} ({how}): {dog.fired}\n{drv.where()}\nlog: {log}"
        if error is not None:  # the mount died under us: it must have
            try:
                wait_for(lambda: proc.poll() is not None or zombie(proc.pid), 5, "the mount to die")
            except AssertionError:
                kill(proc, m)
                drv.close_fds()
                raise AssertionError(f"iteration {it} ({how}): the mount answered {error!r} while alive\n"
                                     f"{drv.where()}\nlog: {log}") from None
        elif point:  # the point may come after the last operation (release, ingest): give it time
            deadline = time.monotonic() + 5
            while proc.poll() is None and not zombie(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if timer is not None:
            timer.join()
        by_itself = (proc.poll() is not None or zombie(proc.pid)) and not drv.killed_by_test
        kill(proc, m)
        if by_itself:
            assert proc.returncode == -signal.SIGKILL, \
                f"iteration {it} ({how}): the mount exited with {proc.returncode}: {log.read_text()}"
            tally.fired[point] += 1
        elif point:
            tally.retry.add(point)  # its next turn comes with n = 1
            how += " (not reached: killed from outside)"
        drv.close_fds()
    moment = (f"during a {drv.inflight.what.split()[0]}" if drv.inflight
              else "between two calls" if error is None else "during a call that acknowledges nothing")
    tally.moments[moment] += 1
    if drv.current:
        tally.during[drv.current] += 1
    return drv, f"{how}, {moment}" + (f" in {op_label(*drv.current)}" if drv.current else "")


def op_label(op: str, st: str) -> str:
    return f"{op} (file {st})" if st else op


def holds(pid: int, name: str) -> bool:
    """Whether process pid has a file called name open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/" + name):
                return True
        except OSError:
            pass
    return False


def restart_killed(it: int, store: Path, m: Path, logs: Path, tally: Tally) -> str:
    """Start a mount after a crash and SIGKILL it as it starts: within 1.5 ms of taking the
    staging lock (in its staging recovery, or as it mounts), or while it ingests what it
    recovered. Recovery must survive its own crash."""
    rng = random.Random(f"{SEED}/{it}/restart")
    log = logs / f"restart{it}.log"
    with open(log.with_suffix(".out"), "wb") as out:
        proc = subprocess.Popen(zipfs_cmd(store, "mount", str(m), "--foreground", "--log-file", str(log)),
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        if rng.random() < 0.6:  # the staging lock is taken right before recovery
            deadline = time.monotonic() + 30
            while not holds(proc.pid, "staging.lock"):  # no sleep: recovery and mounting take ~1 ms
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            until = time.perf_counter() + rng.uniform(0, 0.0015)
            while time.perf_counter() < until:
                pass
        else:
            wait_for(lambda: in_mount_table(m), 30, "the mount", proc, log)
            time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        mounted_yet = in_mount_table(m)
        kill(proc, m)
        recovered = log.exists() and "staging: " in log.read_text()
        when = ("after mounting" if mounted_yet else "after recovery" if recovered
                else "before the end of recovery")
    finally:
        try:
            kill(proc, m)
        finally:
            unmount_dead(m)
    tally.restarts[when] += 1
    return f"; the next mount was killed as it started ({when})"


def test_sigkill_at_random_moments_loses_nothing_acknowledged(models, payloads, tmp_path):
    """The random crash test the module docstring describes."""
    t0 = time.monotonic()
    store, m = tmp_path / "store", tmp_path / "m"
    files = Files()
    files.apply(seed_store(store, payloads, tmp_path))
    base_cfg = models["minilm"] / "config.json"
    subprocess.run(zipfs_cmd(store, "ingest", str(base_cfg), "--name", "base/config.json"),
                   check=True, capture_output=True)
    files.apply({"base/config.json": base_cfg.read_bytes()})
    serial = iter(range(1, 1 << 30))
    tally = Tally()
    with mounted(store, m, log=tmp_path / "setup.log") as proc:  # staged files for the first iterations
        for d in DIRS:
            (m / d).mkdir()
        drv = Driver(m, proc, files, payloads, random.Random(SEED), serial, tally.coverage)
        for _ in range(3):
            drv.op_create()
        assert not drv.fds
    for it, how in enumerate(kill_plan(ITERATIONS, random.Random(SEED))):
        drv, what = crash(it, how, store, m, files, payloads, serial, tally, tmp_path)
        if it % 4 == 3:
            what += restart_killed(it, store, m, tmp_path, tally)
        check_log = tmp_path / f"check{it}.log"
        with mounted(store, m, log=check_log):
            if check(m, files, drv.inflight, it, what, drv, [tmp_path / f"crash{it}.log", check_log]):
                files.apply(drv.inflight.change)
                tally.landed += 1
        print(f"iteration {it}: {what}; {drv.steps} calls, {drv.acks} acknowledged")
    print(f"{ITERATIONS} kills in {time.monotonic() - t0:.0f} s; fault points that fired: "
          f"{dict(tally.fired)}; kill moments: {dict(tally.moments)}; calls in flight that landed: "
          f"{tally.landed}; restarts killed: {dict(tally.restarts)}")
    print("killed during: " + ", ".join(f"{op_label(op, st)}: {n}"
                                        for (op, st), n in sorted(tally.during.items())))
    print("operations by the state of the file they changed: " +
          ", ".join(f"{op} {st}: {n}" for (op, st), n in sorted(tally.coverage.items()) if st))
    assert sum(tally.fired.values()) >= ITERATIONS // 4, f"only {dict(tally.fired)} fault points fired"
    if ITERATIONS >= 50:
        assert set(tally.fired) == set(POINTS), f"points never reached: {set(POINTS) - set(tally.fired)}"
        ops = ("overwrite", "patch", "truncate shorter", "truncate longer", "ftruncate shorter",
               "ftruncate longer", "append", "rename-over")
        missing = [(op, st) for op in ops for st in ("stored", "staged")
                   if not sum(n for (o, s), n in tally.coverage.items()
                              if o == op and (s == "stored") == (st == "stored"))]
        assert not missing, f"never done: {missing}"
    final = tmp_path / "final.log"
    with mounted(store, m, log=final):
        r = subprocess.run(zipfs_cmd(store, "sync", "--wait", "--timeout", "300", str(m)),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr + final.read_text()[-4000:]
        seen = visible_files(m)
        assert set(seen) == set(files.acked), (f"missing: {set(files.acked) - set(seen)}, "
                                               f"unexpected: {set(seen) - set(files.acked)}")
        for path, a in files.acked.items():
            data = seen[path].read_bytes()
            assert data == a.data, f"{path}: {files.explain(path, data, None)}"
            assert os.getxattr(seen[path], "user.zipfs.state") == b"stored", path
    for cmd in ("verify", "fsck"):
        r = subprocess.run(zipfs_cmd(store, cmd), capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_an_empty_file_made_by_mknod_survives_a_crash_during_its_first_write(tmp_path):
    """mknod(S_IFREG) returned: the empty file is there, durably. A write to it that no close
    acknowledged must leave it empty after a crash, not remove it (as for a file that create()
    made and no close acknowledged)."""
    store, m = tmp_path / "store", tmp_path / "m"
    log = tmp_path / "crash.log"
    with crash_mount(store, m, log, {}) as proc:
        os.mknod(m / "made-by-mknod", stat.S_IFREG | 0o644)
        fd = os.open(m / "made-by-mknod", os.O_WRONLY)
        os.write(fd, b"never acknowledged")
        kill(proc, m)
        with contextlib.suppress(OSError):
            os.close(fd)
    with mounted(store, m, log=tmp_path / "check.log"):
        assert visible_files(m).keys() == {"made-by-mknod"}, (tmp_path / "check.log").read_text()
        assert (m / "made-by-mknod").read_bytes() == b""


def test_a_reader_of_a_staged_file_still_reads_it_after_its_name_is_gone(models, tmp_path):
    """A descriptor open on a file keeps its bytes readable after an unlink or a rename over it
    (POSIX), also while the file is staged and waits in the ingest queue (here behind two 90 MB
    models, so it is not ingested meanwhile: behind one, a loaded machine ingested it before the
    next file was even closed)."""
    store, m = tmp_path / "store", tmp_path / "m"
    data = (models["sre"] / "tokenizer.json").read_bytes()
    with mounted(store, m, log=tmp_path / "mount.log"):
        for role in ("minilm", "sre"):
            (m / f"{role}.safetensors").write_bytes((models[role] / "model.safetensors").read_bytes())
        for how in ("unlink", "rename"):
            (m / f"{how}.json").write_bytes(data)
            assert os.getxattr(m / f"{how}.json", "user.zipfs.state") == b"staged"
            with open(m / f"{how}.json", "rb") as reader:
                if how == "unlink":
                    os.unlink(m / f"{how}.json")
                else:
                    (m / "new.json").write_bytes(b"{}")
                    os.rename(m / "new.json", m / f"{how}.json")
                assert reader.read() == data, how


def test_a_fine_tune_stays_ingestable_after_its_base_model_is_removed(payloads, tmp_path):
    """A model delta-coded against another (its base, in its model record) gets a new file
    through the mount after the base was removed (rm -r in the mount; `zipfs rm` allows it too):
    the new file must still be ingested, with another base or none."""
    store, m = tmp_path / "store", tmp_path / "m"
    for name, payload in (("base", "layer-minilm"), ("tuned", "layer-sre")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(payloads[payload])
        r = subprocess.run(zipfs_cmd(store, "ingest", str(tmp_path / name)), capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    assert "base: base (" in r.stdout, r.stdout  # the precondition: tuned is delta-coded against base
    log = tmp_path / "mount.log"
    with mounted(store, m, log=log):
        os.unlink(m / "base" / "model.safetensors")
        os.rmdir(m / "base")
        (m / "tuned" / "extra.safetensors").write_bytes(payloads["layer-sre"])
        r = subprocess.run(zipfs_cmd(store, "sync", "--wait", "--timeout", "60", str(m)),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr + log.read_text()
        assert os.getxattr(m / "tuned" / "extra.safetensors", "user.zipfs.state") == b"stored"


def test_a_mount_killed_as_it_starts_serving_exits_and_its_mount_point_answers(tmp_path):
    """SIGKILL in the first milliseconds a mount serves (the crash test's kills can land there):
    the process must exit, so that its mount point answers (ENOTCONN) instead of hanging every
    process that touches it. The kills land from 0.3 to 5 ms after the mount appears, twice over."""
    store, m = tmp_path / "store", tmp_path / "m"
    m.mkdir()
    for i, delay in enumerate([0.0003 * 1.12 ** k for k in range(25)] * 2):
        log = tmp_path / f"mount{i}.log"
        proc = subprocess.Popen(zipfs_cmd(store, "mount", str(m), "--foreground", "--log-file", str(log)),
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not in_mount_table(m):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(delay)
            try:
                kill(proc, m)
            except AssertionError as e:
                raise AssertionError(f"killed {delay * 1000:.1f} ms after it mounted: {e}") from None
        finally:
            try:
                kill(proc, m)
            finally:
                unmount_dead(m)
