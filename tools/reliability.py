#!/usr/bin/env python3
"""The reliability suite, runnable longer than in CI: parser fuzzing, corruption injection,
concurrent ingest + rm + gc + reads followed by fsck, and metadata corruption (one flipped byte
of data.mdb, or a truncated one, then every command and a mount). Prints its figures.

    .venv/bin/python tools/reliability.py [--fuzz 20000] [--corruptions 500] [--rounds 6] \
        [--flips 500] [--truncations 20] [--seed 0] [-v]
    .venv/bin/python tools/reliability.py --replay OFFSET:XOR[:ro]   # one flip trial, shown

The same functions run (smaller) in tests/test_reliability.py.
"""

from __future__ import annotations

import argparse
import bisect
import errno
import hashlib
import json
import os
import queue
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models  # noqa: E402
from zipfs.errors import CorruptChunkError, FormatError  # noqa: E402
from zipfs.formats import safetensors as st  # noqa: E402
from zipfs.fs.process import ROOT as PROCESS_ROOT  # noqa: E402
from zipfs.fs.process import stop, zipfs_cmd  # noqa: E402
from zipfs.ingest.ingester import Ingester  # noqa: E402
from zipfs.ingest.model import ingest_model, ingest_one  # noqa: E402
from zipfs.read.cache import ChunkCache  # noqa: E402
from zipfs.read.chunks import ChunkSource  # noqa: E402
from zipfs.read.reader import FileLayout, Reader  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402
from zipfs.store.records import u64key  # noqa: E402


def mutate(header: bytes, rng: random.Random) -> bytes:
    """One malformed variant of a real safetensors prefix (8-byte length + JSON + some data)."""
    b = bytearray(header)
    kind = rng.randrange(7)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(len(b))]
    elif kind == 2:  # lie about the header length
        b[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(b), 2**63, 10**8 + 1, rng.randrange(2**64)]))
    elif kind == 3:  # rewrite a number inside the JSON
        text = b.decode("latin-1")
        digits = [i for i, c in enumerate(text) if c.isdigit() and i > 8]
        if digits:
            i = rng.choice(digits)
            b[i:i + 1] = str(rng.choice([0, 9, 10**12, -1])).encode()
    elif kind == 4:  # deep nesting
        depth = rng.randint(100, 5000)
        js = b"{" + b'"a":[' * depth + b"]" * depth + b"}"
        b = bytearray(struct.pack("<Q", len(js)) + js)
    elif kind == 5:  # random structure of valid JSON
        js = json.dumps({"t": {"dtype": rng.choice(["F32", "BF16", "X", 3]),
                               "shape": [rng.randint(-2, 10**9) for _ in range(rng.randint(0, 3))],
                               "data_offsets": [rng.randint(-1, 100), rng.randint(-1, 10**10)]}}).encode()
        b = bytearray(struct.pack("<Q", len(js)) + js + bytes(rng.randrange(64)))
    else:  # garbage
        b = bytearray(rng.randbytes(rng.randrange(1, 256)))
    return bytes(b)


def fuzz_parser(real: bytes, n: int, seed: int = 0) -> dict:
    """Parse n malformed variants: only FormatError may come out, each quickly, in bounded memory."""
    rng = random.Random(seed)
    n_len = struct.unpack("<Q", real[:8])[0]
    prefix = real[: 8 + n_len + 256]
    refused = accepted = 0
    worst = 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(n):
        blob = mutate(prefix, rng)
        size = len(blob) if rng.random() < 0.5 else len(real)
        t0 = time.perf_counter()
        try:
            hl = st.header_length(blob[:8], size)
            h = st.parse_header(blob[8:8 + hl], size)
            st.segments(h, size)
            accepted += 1
        except FormatError:
            refused += 1
        worst = max(worst, time.perf_counter() - t0)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    return {"inputs": n, "refused": refused, "accepted": accepted, "worst_seconds": worst,
            "rss_growth_bytes": rss_growth}


def corruption_trials(store: Store, path: str, original: bytes, n: int, seed: int = 0) -> dict:
    """Damage one random stored payload at a time (a bit flip or a truncation), in a chunk of the
    file or in the base chunk a delta of it needs; reads must fail or be exact, never wrong."""
    rng = random.Random(seed)
    with store.read() as txn:
        layout = FileLayout.of(store.file_at(txn, path))
        base_of = {c: store.chunk(txn, c).base for c in layout.chunk_ids}
    detected = exact = wrong = 0
    for _ in range(n):
        i = rng.randrange(len(layout.chunk_ids))
        target = layout.chunk_ids[i]
        cid = base_of[target] if base_of[target] and rng.random() < 0.5 else target
        with store.env.begin(write=True) as txn:
            good = bytes(txn.get(u64key(cid), db=store.db["payloads"]))
            bad = bytearray(good)
            if rng.random() < 0.2:
                bad = bad[: rng.randrange(len(bad))]
            else:
                bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            txn.put(u64key(cid), bytes(bad), db=store.db["payloads"])
        try:
            start = layout.starts[i]
            got = Reader(store, ChunkSource(store, ChunkCache(8 << 20))).read(layout, start, 1 << 20)
            if got == original[start:start + len(got)]:
                exact += 1
            else:
                wrong += 1
        except CorruptChunkError:
            detected += 1
        finally:
            with store.env.begin(write=True) as txn:
                txn.put(u64key(cid), good, db=store.db["payloads"])
    return {"faults_injected": n, "detected": detected, "read_exact": exact, "wrong_bytes": wrong}


def churn(store_path: Path, model_dir: Path, rounds: int) -> dict:
    """Concurrent ingest, rm and gc in separate processes while this one reads and verifies."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with Store(store_path) as store, Ingester(store) as ing:
        ingest_one(ing, model_dir / "model.safetensors", "keep/model.safetensors")
    want = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    cli = " ".join(zipfs_cmd(store_path))
    ingest_rm = (f"for i in $(seq 1 {rounds}); do {cli} ingest {model_dir} --name churn/m$i --workers 1 "
                 f">/dev/null; {cli} rm churn/m$((i-1)) >/dev/null 2>&1 || true; done")
    collect = f"for i in $(seq 1 {rounds * 2}); do {cli} gc >/dev/null; sleep 0.2; done"
    workers = [subprocess.Popen(["bash", "-c", script], env=env) for script in (ingest_rm, collect)]
    reads = 0
    with Store(store_path) as store:
        reader = Reader(store)
        while any(w.poll() is None for w in workers):
            layout = reader.layout("keep/model.safetensors")
            h = hashlib.sha256()
            for block in reader.iter_file(layout):
                h.update(block)
            if h.hexdigest() != want:
                raise AssertionError("a read during churn returned wrong bytes")
            reads += 1
    codes = [w.wait() for w in workers]
    fsck = subprocess.run([*zipfs_cmd(store_path), "fsck", "--scrub"], env=env, capture_output=True,
                          text=True)
    verify = subprocess.run([*zipfs_cmd(store_path), "verify"], env=env, capture_output=True, text=True)
    failed = verify.stdout.count("FAILED")
    return {"rounds": rounds, "full_reads_during_churn": reads, "worker_exit_codes": codes,
            "fsck_clean": fsck.returncode == 0, "fsck": fsck.stdout.strip().splitlines()[-1],
            "verify": verify.stdout.strip().splitlines()[-1], "files_lost": failed}


# ---- metadata corruption: one flipped byte of data.mdb, then every command and a mount ----

#: LMDB page layout (0.9, 64-bit): a 16-byte header whose flags (u16 at 10) say the page type;
#: an overflow page's header holds its run length (u32 at 12), a branch or leaf page's the start of
#: its free space (lower, u16 at 12) and of its nodes (upper, u16 at 14)
PAGE, P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 4096, 0x01, 0x02, 0x04, 0x08
#: header + MDB_meta (magic, version, address, map size, two MDB_db, last page, txn id)
META_USED = 16 + 136
#: in a meta page: the root page number (u64) of the main DB (the table of tables), the txn id
META_MAIN_ROOT, META_TXNID = 128, 144
#: the share of each kind of page among the flips aimed at structure: by bytes, the two meta
#: pages and the few branch pages would hardly ever be hit
STRUCTURAL = {"meta": 0.15, "branch": 0.2, "leaf": 0.5, "record": 0.15}
#: seconds a command may take on a 90 MiB store before it counts as a hang
CMD_TIMEOUT = int(os.environ.get("ZIPFS_FLIP_TIMEOUT", "120"))


def page_map(store_dir: Path) -> list[tuple[int, int, str, list[tuple[int, int]]]]:
    """(first page, pages, kind, used byte ranges) of every page run of a store's data.mdb.

    Kinds: meta, branch, leaf, payload (an overflow run holding a chunk payload: only the chunk
    checksum guards it), record (an overflow run holding a sealed record too large for a leaf,
    such as a big file record), free (anything else: stale or never written). Payload runs are
    told apart by where LMDB's zero-copy values of the payloads table point into the map, so the
    fuzz can aim at the pages whose damage only the seals and the B-tree code can catch.
    """
    data_path = store_dir / "lmdb" / "data.mdb"
    payload_pages: set[int] = set()
    with Store(store_dir, create=False) as store, store.read() as txn:
        for _, v in txn.cursor(db=store.db["payloads"]):
            off = np.frombuffer(v, dtype=np.uint8).ctypes.data - store._map_base
            if (off - 16) % PAGE == 0:  # small payloads live inside leaf pages
                payload_pages.add((off - 16) // PAGE)
    data = data_path.read_bytes()
    runs: list[tuple[int, int, str, list[tuple[int, int]]]] = []
    npages, pg = len(data) // PAGE, 0
    while pg < npages:
        base = pg * PAGE
        pgno, _, flags, lower, upper = struct.unpack_from("<QHHHH", data, base)
        if pgno != pg:
            runs.append((pg, 1, "free", []))
            pg += 1
        elif flags & P_OVERFLOW:
            count = max(1, min(struct.unpack_from("<I", data, base + 12)[0], npages - pg))
            kind = "payload" if pg in payload_pages else "record"
            runs.append((pg, count, kind, [(base, base + count * PAGE)]))
            pg += count
        elif flags & P_META:
            runs.append((pg, 1, "meta", [(base, base + META_USED)]))
            pg += 1
        elif flags & (P_BRANCH | P_LEAF):
            used = [(base, base + min(lower, PAGE)), (base + min(upper, PAGE), base + PAGE)]
            runs.append((pg, 1, "branch" if flags & P_BRANCH else "leaf", used))
            pg += 1
        else:
            runs.append((pg, 1, "free", []))
            pg += 1
    return runs


def record_offset(store_dir: Path, table: str, key: bytes) -> int:
    """Where in data.mdb the value of a record lies (to damage that very record)."""
    with Store(store_dir, create=False) as store, store.read() as txn:
        v = txn.get(key, db=store.db[table])
        if v is None:
            raise KeyError(f"{table} has no record {key.hex()}")
        return np.frombuffer(v, dtype=np.uint8).ctypes.data - store._map_base


def newest_meta_offset(store_dir: Path) -> int:
    """Where the meta page LMDB opens (the one with the higher transaction id) starts."""
    with open(store_dir / "lmdb" / "data.mdb", "rb") as f:
        head = f.read(2 * PAGE)
    txnids = [struct.unpack_from("<Q", head, p * PAGE + META_TXNID)[0] for p in (0, 1)]
    return PAGE * txnids.index(max(txnids))


#: fields of a meta page by their in-page offset: the page header, MDB_meta, its two MDB_db
_META_FIELDS = [(0, "page number"), (8, "page pad"), (10, "page flags"), (12, "page bounds"),
                (16, "magic"), (20, "version"), (24, "address"), (32, "map size")] + [
    (base + o, f"{db} db {name}") for base, db in ((40, "free"), (88, "main"))
    for o, name in ((0, "pad (page size)"), (4, "flags"), (6, "depth"), (8, "branch pages"),
                    (16, "leaf pages"), (24, "overflow pages"), (32, "entries"), (40, "root page"))] + [
    (136, "last page"), (144, "txn id"), (152, "unused")]


def where(store_dir: Path, offset: int) -> str:
    """What lies at offset of the pristine store's data.mdb, in words: a meta page field, or the
    table and record whose key or value (or whose leaf page) holds it. Store layouts differ from
    build to build (ingest threads), so a failure is reproduced from this, with record_offset."""
    pg, at = divmod(offset, PAGE)
    if pg < 2:
        name = [n for o, n in _META_FIELDS if o <= at][-1]
        which = "newest" if newest_meta_offset(store_dir) == pg * PAGE else "older"
        return f"meta page {pg} ({which}), {name}"
    same_page = set()
    with Store(store_dir, create=False) as store, store.read() as txn:
        main = txn.cursor()  # the main DB: one record per table, its value that table's MDB_db
        tables = [(bytes(k).decode(errors="replace"), store.env.open_db(bytes(k), create=False, txn=txn))
                  for k, _ in main]
        for table, db in [("(main db)", None), *tables]:
            for k, v in (txn.cursor(db=db) if db is not None else txn.cursor()):
                for part, buf in (("key", k), ("value", v)):
                    a = np.frombuffer(buf, dtype=np.uint8).ctypes.data - store._map_base if len(buf) else -1
                    if 0 <= a <= offset < a + len(buf):
                        return f"{table} record {bytes(k).hex()[:32]}, {part} byte {offset - a} of {len(buf)}"
                    if a >= 0 and a // PAGE == pg:
                        same_page.add(table)
    if same_page:
        return f"leaf page of {', '.join(sorted(same_page))}: a node header, the pointer array or free space"
    return f"page {pg} ({_kind_at(page_map(store_dir), offset)})"


def _kind_at(runs: list[tuple[int, int, str, list[tuple[int, int]]]], offset: int) -> str:
    pg = offset // PAGE
    i = bisect.bisect_right([r[0] for r in runs], pg) - 1
    return runs[i][2] if i >= 0 and pg < runs[i][0] + runs[i][1] else "beyond"


def _cli_child(argv: list[str], out_path: str, err_path: str) -> None:
    """A forked child running the CLI in-process with stdout and stderr on files: as a command
    of its own (a SIGBUS or SIGSEGV shows as its exit status), without a fresh interpreter's
    start-up cost (the fork server has zipfs imported already)."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.pop("ZIPFS_DEBUG", None)  # a bug must show as the CLI shows it to users
    from zipfs.cli import main as cli_main

    code = cli_main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _read_child(mnt: str, files: list[str], dirs: list[str], result_path: str) -> None:
    """Read every file through a mount with plain open/read, list its directories; write
    {name: ["ok", sha256] | ["err", errno, message]} as JSON (a child: a hung request is killed)."""
    res: dict[str, dict[str, list]] = {"files": {}, "dirs": {}}
    for name in files:
        try:
            with open(os.path.join(mnt, name), "rb") as f:
                res["files"][name] = ["ok", hashlib.sha256(f.read()).hexdigest()]
        except OSError as e:
            res["files"][name] = ["err", e.errno, str(e)]
    for d in dirs:
        try:
            res["dirs"][d] = ["ok", sorted(os.listdir(os.path.join(mnt, d)))]
        except OSError as e:
            res["dirs"][d] = ["err", e.errno, str(e)]
    Path(result_path).write_text(json.dumps(res))
    os._exit(0)


def _fork_server() -> None:
    """Serve fork requests, one JSON line each way on stdin/stdout: {"fn", "args", "timeout"} ->
    {"rc"}. Run with zipfs imported once, so that each command costs a fork, not an interpreter
    start, and still runs in a process of its own: its crash is an exit status, not ours."""
    import zipfs.cli  # noqa: F401 - imported before the forks, for them
    import zipfs.fs.mount  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                globals()[req["fn"]](*req["args"])
            except BaseException:  # noqa: BLE001 - shown the way the parent looks for it
                traceback.print_exc()
            finally:
                os._exit(1)
        deadline = time.monotonic() + req["timeout"]
        while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.002)
        if not done[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(done[1]) if done[0] else None}), flush=True)


class Forks:
    """A fork server of our own (one per concurrent trial): _fork_server in a child process."""

    def __init__(self) -> None:
        self._server: subprocess.Popen | None = None

    def run(self, target: Callable[..., None], *args: object, timeout: float = CMD_TIMEOUT) -> int | None:
        """Run target(*args) (a function of this module taking JSON arguments) in a forked process;
        its exit status (negative: killed by that signal), or None when it ran past timeout."""
        if self._server is None or self._server.poll() is not None:
            path = os.pathsep.join([str(PROCESS_ROOT), str(Path(__file__).resolve().parent)])
            self._server = subprocess.Popen(
                [sys.executable, "-c", "import reliability; reliability._fork_server()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=path),
                text=True)
        assert self._server.stdin and self._server.stdout
        self._server.stdin.write(json.dumps({"fn": target.__name__, "args": args, "timeout": timeout}) + "\n")
        self._server.stdin.flush()
        reply = self._server.stdout.readline()
        if not reply:
            raise RuntimeError("the fork server died")
        return json.loads(reply)["rc"]

    def close(self) -> None:
        if self._server is not None:
            assert self._server.stdin
            self._server.stdin.close()
            self._server.wait()
            self._server = None


@dataclass
class Ran:
    """One command of a trial: its exit status (None: hung), stdout and stderr."""

    what: str
    rc: int | None
    out: bytes
    err: str


@dataclass
class Lab:
    """Where one trial at a time runs: a work directory (the store copy, a mount point, command
    output) and a fork server of its own, so that trials can run side by side."""

    work: Path
    forks: Forks = field(default_factory=Forks)

    @property
    def store(self) -> Path:
        return self.work / "store"

    def fresh_copy(self, pristine: Path) -> Path:
        """A private copy of the pristine store (its data.mdb; LMDB makes a new lock file)."""
        shutil.rmtree(self.store, ignore_errors=True)
        (self.store / "lmdb").mkdir(parents=True, mode=0o700)
        shutil.copyfile(pristine / "lmdb" / "data.mdb", self.store / "lmdb" / "data.mdb")
        return self.store

    def cli(self, *args: str) -> Ran:
        """`zipfs --store STORE args...` in a forked process."""
        out, err = self.work / "stdout", self.work / "stderr"
        rc = self.forks.run(_cli_child, ["--store", str(self.store), *args], str(out), str(err))
        return Ran(" ".join(args), rc, out.read_bytes() if out.exists() else b"",
                   err.read_text(errors="replace") if err.exists() else "")

    @contextmanager
    def mount(self, read_only: bool) -> Iterator[tuple[subprocess.Popen, bool]]:
        """A foreground mount in a subprocess, as zipfs.fs.process.mounted starts one, but with its
        stderr kept on a file: a mount that refuses a damaged store must say why in one line.
        Yields (process, mounted); never leaves the mount behind."""
        mnt = self.work / "mnt"
        mnt.mkdir(exist_ok=True)
        (self.work / "mount.log").unlink(missing_ok=True)  # the mount appends to its log
        extra = ["--read-only"] if read_only else []
        with open(self.work / "mount.err", "wb") as err:
            proc = subprocess.Popen(
                zipfs_cmd(self.store, "mount", str(mnt), "--foreground", "--log-file",
                          str(self.work / "mount.log"), "--cache-size", "128M", "--workers", "2", *extra),
                env=dict(os.environ, PYTHONPATH=str(PROCESS_ROOT)), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 60
            while not os.path.ismount(mnt) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            yield proc, os.path.ismount(mnt)
        finally:
            stop(proc, mnt, timeout=20)

    def mount_err(self) -> str:
        return (self.work / "mount.err").read_text(errors="replace")

    def close(self) -> None:
        self.forks.close()
        if os.path.ismount(self.work / "mnt"):
            raise AssertionError(f"a mount was left behind at {self.work / 'mnt'}")


@dataclass
class Trial:
    """What one damaged store did. `problems` are failures of the promise; `errors` are damage
    reported as it should be (a one-line error, EIO); `changes` are differences from the pristine
    store that came with success but are not file bytes (a listing, a count)."""

    offset: int = -1
    xor: int = 0
    kind: str = ""
    read_only: bool = False
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    #: errors that name neither the file nor the store
    notes: list[str] = field(default_factory=list)
    #: what the flipped byte belonged to (see `where`), for failing trials
    where: str = ""
    tags: set[str] = field(default_factory=set)
    mount_refused: bool = False
    read_failed: bool = False
    fsck_clean: bool = False

    def fail(self, tag: str, msg: str) -> None:
        self.tags.add(tag)
        self.problems.append(msg)


def _judge(t: Trial, r: Ran, one_line: bool) -> bool:
    """Check one command's result against the promise; True when it succeeded. A failure must
    be a positive exit with one line on stderr starting 'zipfs: ' (one_line); or, for commands
    that report per item (verify and fsck on stdout, ls a line per damaged entry), only such
    lines."""
    if r.rc is None:
        t.fail("hangs", f"{r.what}: no answer in {CMD_TIMEOUT} s")
        return False
    if r.rc < 0:
        t.fail("signals", f"{r.what}: killed by {signal.Signals(-r.rc).name}")
    if "Traceback" in r.err:
        t.fail("tracebacks", f"{r.what}: traceback: {r.err.strip().splitlines()[-1]}")
    if "internal error" in r.err:
        t.fail("internal_errors", f"{r.what}: {r.err.strip()}")
    if r.rc <= 0:
        return r.rc == 0
    lines = r.err.strip("\n").splitlines()
    bad = (len(lines) != 1) if one_line else not (lines or r.out)
    if bad or any(not ln.startswith("zipfs: ") for ln in lines):
        t.fail("bad_error_lines", f"{r.what}: exit {r.rc} with stderr {r.err[:300]!r}")
    said = lines or r.out.decode(errors="replace").splitlines() or ["(nothing)"]
    t.errors.append(f"{r.what}: {said[0] if lines else said[-1]}")
    return False


def _dirs_of(files: dict[str, bytes]) -> dict[str, list[str]]:
    """Every directory the stored names imply ('' is the root), with its sorted entries."""
    out: dict[str, set[str]] = {"": set()}
    for name in files:
        parts = name.split("/")
        for i in range(len(parts)):
            out.setdefault("/".join(parts[:i]), set()).add(parts[i])
    return {d: sorted(entries) for d, entries in out.items()}


def run_trial(lab: Lab, files: dict[str, bytes], baseline: dict[str, bytes], t: Trial) -> Trial:
    """Every command against the (damaged) store of lab, then a mount reading every file.

    baseline holds the pristine store's stdout of verify, ls, stats (models, counts) and fsck: the
    same output with success is "nothing observable changed"; different output with success is
    a change the seals let through (e.g. LMDB opening the older meta page: a valid older store).
    """
    for key in ("verify", "ls", "stats"):
        r = lab.cli(key)
        if _judge(t, r, one_line=key == "stats") and r.out != baseline[key]:
            t.changes.append(f"{key}: {r.out.decode(errors='replace').strip()[-200:]!r}")
        t.read_failed |= key == "verify" and r.rc != 0
    for name, want in files.items():
        r = lab.cli("cat", name)
        if not _judge(t, r, one_line=True):
            t.read_failed = True
            if r.rc and name not in r.err and str(lab.store) not in r.err:
                t.notes.append(f"cat {name}: {r.err.strip()[:200]}")
        elif r.out != want:
            t.fail("wrong_bytes", f"cat {name}: exit 0 with {len(r.out)} bytes that differ from the "
                                  f"file's {len(want)}")
    r = lab.cli("fsck", "--scrub")
    t.fsck_clean = _judge(t, r, one_line=False)
    if t.fsck_clean and r.out != baseline["fsck"]:
        t.changes.append(f"fsck: {r.out.decode(errors='replace').strip()!r}")
    if t.fsck_clean and t.read_failed:
        t.tags.add("fsck_missed")
    _mount_trial(lab, files, t)
    return t


def _mount_trial(lab: Lab, files: dict[str, bytes], t: Trial) -> None:
    """Mount the store, read every file and list every directory through it in a child, check
    the bytes; then the mount must still be alive, and must unmount without a signal."""
    mnt = lab.work / "mnt"
    with lab.mount(t.read_only) as (proc, live):
        if not live:
            rc = proc.wait()
            _judge(t, Ran("mount", rc, b"", lab.mount_err()), one_line=True)
            log_path = lab.work / "mount.log"
            if log_path.exists() and " mounted " in log_path.read_text(errors="replace"):
                t.fail("mount_deaths", f"mount: exited ({rc}) right after mounting")
            elif rc == 0:
                t.fail("mount_deaths", "mount: exited 0 without mounting")
            else:
                t.mount_refused = True
            return
        res_path = lab.work / "reads.json"
        res_path.unlink(missing_ok=True)
        dirs = _dirs_of(files)
        if lab.forks.run(_read_child, str(mnt), list(files), list(dirs), str(res_path)) is None:
            t.fail("hangs", "mount: reads got no answer")
        res = json.loads(res_path.read_text()) if res_path.exists() else {"files": {}, "dirs": {}}
        for name, got in res["files"].items():
            if got[0] == "ok":
                if got[1] != hashlib.sha256(files[name]).hexdigest():
                    t.fail("wrong_bytes", f"mount read {name}: success with different bytes")
            elif got[1] == errno.ENOTCONN:
                t.fail("mount_deaths", f"mount read {name}: {got[2]}")
            else:
                t.read_failed = True
                t.errors.append(f"mount read {name}: {got[2]}")
                if got[1] != errno.EIO:
                    t.tags.add(f"errno_{errno.errorcode.get(got[1], got[1])}")
        for d, got in res["dirs"].items():
            if got[0] == "ok" and got[1] != dirs[d]:
                t.changes.append(f"mount listdir /{d}: {got[1]}")
        if proc.poll() is not None or not os.path.ismount(mnt):
            t.fail("mount_deaths", f"mount: died during reads (exit {proc.poll()})")
    if proc.returncode is not None and proc.returncode < 0:
        t.fail("signals", f"mount: killed by {signal.Signals(-proc.returncode).name}")
    if "Traceback" in (err := lab.mount_err()):
        t.fail("tracebacks", f"mount: traceback on stderr: {err.strip().splitlines()[-1]}")
    log_path = lab.work / "mount.log"
    if log_path.exists() and "Traceback" in (log := log_path.read_text(errors="replace")):
        # the guard answered EIO, but only after an exception that is not a ZipfsError: a bug
        last = [ln for ln in log.splitlines() if ln and not ln.startswith((" ", "Traceback"))]
        t.fail("mount_log_tracebacks", f"mount log: {last[-1] if last else 'traceback'}")


def _baseline(lab: Lab, pristine: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """The undamaged store's output; raises when the undamaged store itself does not pass."""
    lab.fresh_copy(pristine)
    base = {k: lab.cli(*args).out for k, args in
            (("verify", ["verify"]), ("ls", ["ls"]), ("stats", ["stats"]), ("fsck", ["fsck", "--scrub"]))}
    t = run_trial(lab, files, base, Trial())
    if t.problems or t.errors or t.changes or t.mount_refused:
        raise AssertionError(f"the undamaged store does not pass: {t}")
    return base


#: counts of metadata_flips and truncations that break the promise (each must be 0)
FLIP_FAILURES = ("wrong_bytes", "tracebacks", "internal_errors", "signals", "hangs", "mount_deaths",
                 "mount_log_tracebacks", "bad_error_lines")
CUT_FAILURES = ("accepted", "tracebacks", "internal_errors", "signals", "hangs", "bad_error_lines")


def _tally(trials: list[Trial], seconds: float) -> dict:
    out: dict[str, object] = {
        "trials": len(trials),
        "unobservable": sum(not (t.problems or t.errors or t.changes or t.mount_refused) for t in trials),
        "detected": sum(bool(t.errors or t.mount_refused) and not t.problems for t in trials),
        **{k: sum(k in t.tags for t in trials) for k in FLIP_FAILURES},
        "mount_refused": sum(t.mount_refused for t in trials),
        "silent_changes": sum(bool(t.changes) and not t.errors and not t.problems for t in trials),
        "fsck_missed": sum("fsck_missed" in t.tags for t in trials),
        "hangs_not_reproduced": sum("hangs_not_reproduced" in t.tags for t in trials),
        "other_errnos": sorted({tag for t in trials for tag in t.tags if tag.startswith("errno_")}),
        "by_kind": {k: sum(t.kind == k for t in trials) for k in sorted({t.kind for t in trials})},
        "seconds": round(seconds, 1),
    }
    out["failures"] = [{"offset": t.offset, "page": t.offset // PAGE, "in_page": t.offset % PAGE,
                        "xor": t.xor, "kind": t.kind, "where": t.where, "read_only": t.read_only,
                        "problems": t.problems[:5]}
                       for t in trials if t.problems][:40]
    out["refusals"] = sorted({e for t in trials if t.mount_refused
                              for e in t.errors if e.startswith("mount:")})[:5]
    out["cat_errors_unnamed"] = sum(bool(t.notes) for t in trials)
    out["unnamed_examples"] = [n for t in trials for n in t.notes[:1]][:5]
    out["changes"] = [{"offset": t.offset, "xor": t.xor, "kind": t.kind, "where": t.where,
                       "changes": t.changes[:3],
                       "errors": t.errors[:2]} for t in trials if t.changes][:10]
    return out


def flip_trial(lab: Lab, pristine: Path, files: dict[str, bytes], baseline: dict[str, bytes],
               t: Trial) -> Trial:
    """One trial: a fresh copy of the pristine store with data.mdb[t.offset] ^= t.xor, then
    run_trial. Also the way to replay a failure found by metadata_flips (see --replay)."""
    store = lab.fresh_copy(pristine)
    with open(store / "lmdb" / "data.mdb", "r+b") as f:
        f.seek(t.offset)
        b = f.read(1)[0]
        f.seek(t.offset)
        f.write(bytes([b ^ t.xor]))
    return run_trial(lab, files, baseline, t)


def replay(store_dir: Path, files: dict[str, bytes], offset: int, xor: int, read_only: bool = False,
           work: Path | None = None) -> Trial:
    """One flip trial on its own (a failure metadata_flips found, or a chosen byte)."""
    kind = _kind_at(page_map(store_dir), offset)
    with tempfile.TemporaryDirectory(prefix="zipfs-replay-", dir=work) as tmp:
        lab = Lab(Path(tmp))
        try:
            t = flip_trial(lab, store_dir, files, _baseline(lab, store_dir, files),
                           Trial(offset, xor, kind, read_only))
        finally:
            lab.close()
    t.where = where(store_dir, offset)
    return t


def _labs(work: Path, jobs: int) -> queue.Queue[Lab]:
    labs: queue.Queue[Lab] = queue.Queue()
    for j in range(jobs):
        (work / f"lab{j}").mkdir()
        labs.put(Lab(work / f"lab{j}"))
    return labs


def _in_parallel(labs: queue.Queue[Lab], jobs: int, run: Callable[[Lab, Trial], Trial],
                 trials: list[Trial], log: Callable[[str], None] | None) -> None:
    """run(lab, trial) for every trial, jobs at a time, each with a lab of its own."""
    def one(i: int) -> None:
        lab = labs.get()
        try:
            t = run(lab, trials[i])
            if "hangs" in t.tags:  # a loaded host stalls too: only a hang that recurs counts
                again = run(lab, replace(t, problems=[], errors=[], changes=[], notes=[], tags=set()))
                if "hangs" not in again.tags:
                    again.tags.add("hangs_not_reproduced")
                    again.problems.clear()
                trials[i] = t = again
        finally:
            labs.put(lab)
        if log and (t.problems or (i + 1) % 25 == 0):
            log(f"{time.strftime('%H:%M:%S')} trial {i + 1}/{len(trials)} offset {t.offset} "
                f"^{t.xor:#04x} ({t.kind}): " + ("; ".join(t.problems) if t.problems else "ok"))

    with ThreadPoolExecutor(jobs) as pool:
        for f in [pool.submit(one, i) for i in range(len(trials))]:
            f.result()


def _close(labs: queue.Queue[Lab]) -> None:
    while not labs.empty():
        labs.get().close()


def default_jobs() -> int:
    """Trials side by side: each is mostly one busy process at a time."""
    return max(1, min(4, os.cpu_count() or 1))


def metadata_flips(store_dir: Path, files: dict[str, bytes], n: int, seed: int = 0,
                   log: Callable[[str], None] | None = None, jobs: int | None = None,
                   work: Path | None = None) -> dict:
    """Flip one byte of a copy of data.mdb per trial and run verify, ls, cat of every file, fsck
    --scrub and a mount (writable or read-only) reading every file: damage must be a one-line
    error or EIO, never wrong bytes, a traceback, a signal or a dead mount.

    store_dir is a pristine store (left untouched); files maps each stored name to its original
    bytes. Even trials flip a byte anywhere in the file (mostly chunk payloads, which only the
    chunk checksum guards); odd ones a byte LMDB reads in a page that is not a payload run (meta
    pages, branch and leaf pages, overflow runs of large records; shares in STRUCTURAL), where
    only the record seals and LMDB's own checks stand between the damage and the reader. The
    trials are drawn before any runs, so a seed gives the same trials whatever `jobs` is.
    """
    rng = random.Random(seed)
    runs = page_map(store_dir)
    size = (store_dir / "lmdb" / "data.mdb").stat().st_size
    used: dict[str, list[tuple[int, int]]] = {}
    for _, _, kind, ranges in runs:
        if kind in STRUCTURAL:
            used.setdefault(kind, []).extend(rg for rg in ranges if rg[1] > rg[0])
    kinds = sorted(used)
    trials = []
    for i in range(n):
        if i % 2 == 0:
            offset = rng.randrange(size)
        else:
            ranges = used[rng.choices(kinds, [STRUCTURAL[k] for k in kinds])[0]]
            lo, hi = rng.choices(ranges, [hi - lo for lo, hi in ranges])[0]
            offset = rng.randrange(lo, hi)
        trials.append(Trial(offset, rng.randrange(1, 256), _kind_at(runs, offset), rng.random() < 0.5))
    jobs = jobs or default_jobs()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zipfs-flips-", dir=work) as tmp:
        labs = _labs(Path(tmp), jobs)
        try:
            lab = labs.get()
            baseline = _baseline(lab, store_dir, files)
            labs.put(lab)
            _in_parallel(labs, jobs, lambda lab, t: flip_trial(lab, store_dir, files, baseline, t),
                         trials, log)
        finally:
            _close(labs)
    for t in trials:
        if t.problems or t.changes:
            t.where = where(store_dir, t.offset)
    return _tally(trials, time.monotonic() - t0)


def _cut_trial(lab: Lab, pristine: Path, files: dict[str, bytes], t: Trial) -> Trial:
    """A copy of the store with data.mdb cut to t.offset bytes: every command must refuse it."""
    os.truncate(lab.fresh_copy(pristine) / "lmdb" / "data.mdb", t.offset)
    for args in (("verify",), ("ls",), ("cat", sorted(files)[t.xor % len(files)]), ("fsck", "--scrub")):
        if _judge(t, lab.cli(*args), one_line=True):
            t.fail("accepted", f"{' '.join(args)}: exit 0 on a store cut to {t.offset} bytes")
    with lab.mount(t.read_only) as (proc, live):
        if live:
            t.fail("accepted", f"mount: mounted a store cut to {t.offset} bytes")
        else:
            _judge(t, Ran("mount", proc.wait(), b"", lab.mount_err()), one_line=True)
    return t


def truncations(store_dir: Path, files: dict[str, bytes], n: int, seed: int = 0,
                jobs: int | None = None, work: Path | None = None) -> dict:
    """Cut a copy of data.mdb to a random length n times (to 0, inside the meta pages, anywhere):
    every command must refuse the store with one line on stderr (LMDB maps the file and trusts
    its meta page: the first touch of a page past the end would be a SIGBUS)."""
    rng = random.Random(seed)
    size = (store_dir / "lmdb" / "data.mdb").stat().st_size
    trials = [Trial([0, rng.randrange(1, 2 * PAGE), rng.randrange(size)][i % 3], rng.randrange(1 << 16),
                    "truncated", rng.random() < 0.5) for i in range(n)]
    jobs = jobs or default_jobs()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zipfs-cuts-", dir=work) as tmp:
        labs = _labs(Path(tmp), jobs)
        try:
            _in_parallel(labs, jobs, lambda lab, t: _cut_trial(lab, store_dir, files, t), trials, None)
        finally:
            _close(labs)
    return {"trials": n, "one_line_errors": sum(len(t.errors) for t in trials),
            **{k: sum(k in t.tags for t in trials) for k in CUT_FAILURES},
            "seconds": round(time.monotonic() - t0, 1),
            "failures": [{"length": t.offset, "problems": t.problems[:5]} for t in trials if t.problems][:10]}


def build_flip_store(store_dir: Path, models: dict[str, Path]) -> dict[str, bytes]:
    """Ingest the real MiniLM and its fine-tune sre with the CLI, as a user would; each stored
    name (minilm/..., sre/...) with its original bytes."""
    env = dict(os.environ, PYTHONPATH=str(PROCESS_ROOT))
    files: dict[str, bytes] = {}
    for name in ("minilm", "sre"):
        subprocess.run([*zipfs_cmd(store_dir), "ingest", str(models[name]), "--name", name], env=env,
                       check=True, capture_output=True)
        for p in sorted(models[name].rglob("*")):
            if p.is_file():
                files[f"{name}/{p.relative_to(models[name]).as_posix()}"] = p.read_bytes()
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fuzz", type=int, default=20000)
    ap.add_argument("--corruptions", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--flips", type=int, default=500, help="one-byte flips of data.mdb (metadata fuzz)")
    ap.add_argument("--truncations", type=int, default=20, help="data.mdb cut to a random length")
    ap.add_argument("--seed", type=int, default=0, help="seed of the flips and truncations")
    ap.add_argument("--replay", metavar="OFFSET:XOR[:ro]",
                    help="run one flip trial only, on a freshly built store, and show it (store layouts "
                    "differ from build to build: a failure's 'where' says which record to aim at)")
    ap.add_argument("-v", "--verbose", action="store_true", help="report flip trials on stderr")
    args = ap.parse_args()
    models = fetch_models.fetch(["minilm", "sre"])
    real = (models["sre"] / "model.safetensors").read_bytes()
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.replay:
            files = build_flip_store(Path(tmp) / "flips", models)
            off, xor, *ro = args.replay.split(":")
            t = replay(Path(tmp) / "flips", files, int(off, 0), int(xor, 0), bool(ro))
            print(json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in vars(t).items()},
                             indent=2))
            raise SystemExit(1 if t.problems else 0)
        report["parser_fuzz"] = fuzz_parser(real, args.fuzz)
        with Store(Path(tmp) / "c") as store:
            with Ingester(store) as ing:
                ingest_model(ing, models["minilm"] / "model.safetensors", "base.safetensors")
                ingest_model(ing, models["sre"] / "model.safetensors", "tune.safetensors")
            report["corruption"] = corruption_trials(store, "tune.safetensors", real, args.corruptions)
        report["churn"] = churn(Path(tmp) / "churn", models["sre"], args.rounds)
        files = build_flip_store(Path(tmp) / "flips", models)
        say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None
        report["metadata_flips"] = metadata_flips(Path(tmp) / "flips", files, args.flips, args.seed, log=say)
        report["truncations"] = truncations(Path(tmp) / "flips", files, args.truncations, args.seed)
    print(json.dumps(report, indent=2))
    flips, cut = report["metadata_flips"], report["truncations"]
    if (report["corruption"]["wrong_bytes"] or not report["churn"]["fsck_clean"]
            or any(flips[k] for k in FLIP_FAILURES) or any(cut[k] for k in CUT_FAILURES)):
        raise SystemExit(1)

if __name__ == "__main__":
    main()
