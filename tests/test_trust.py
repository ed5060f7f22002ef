"""The reproductions of the independent attack on zipfs's promises, one test each, and their siblings.

Nothing acknowledged is lost (versions, not overwrites), never wrong bytes (every record checked),
no request can kill the mount, open files keep their version against rm, overwrite and gc, and
permissions are stored and enforced. Each test drives the real CLI and a real FUSE mount.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import sha256
from zipfs.fs.process import mounted, unmount, wait_for, zipfs_cmd
from zipfs.store import datafile, inodes
from zipfs.store.lmdb_store import Store
from zipfs.store.records import u64key

MiB = 1 << 20


def cli(store: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(zipfs_cmd(store, *args), capture_output=True, timeout=timeout)


def sync(store: Path, mnt: Path) -> None:
    r = cli(store, "sync", "--wait", "--timeout", "120", str(mnt))
    assert r.returncode == 0, r.stderr


def one_line_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode()
    assert r.returncode != 0 and err.startswith("zipfs: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def base_store(models, tmp_path) -> Path:
    store = tmp_path / "store"
    assert cli(store, "ingest", str(models["minilm"]), "--name", "base/minilm").returncode == 0
    return store


# ---- nothing acknowledged is lost ----

@pytest.mark.parametrize("stored", [True, False], ids=["stored", "staged"])
def test_o_trunc_rewrite_killed_before_close_keeps_the_acknowledged_version(base_store, models, tmp_path,
                                                                            stored):
    m = tmp_path / "m"
    target = m / "base/minilm/tokenizer.json"
    first = (models["minilm"] / "tokenizer.json").read_bytes()
    if not stored:  # a version written through the mount, closed, not yet ingested
        first = os.urandom(3 * MiB)
        with mounted(base_store, m, "--ingest-workers", "1") as proc:
            target.write_bytes(first)
            proc.send_signal(signal.SIGKILL)
    with mounted(base_store, m) as proc:
        assert target.read_bytes() == first
        fd = os.open(target, os.O_WRONLY | os.O_TRUNC)
        for _ in range(20):
            os.write(fd, os.urandom(MiB))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone
    with mounted(base_store, m, log=tmp_path / "after.log"):
        assert target.read_bytes() == first
    assert "lost+found" in os.listdir(base_store)  # the never-acknowledged rewrite is kept there
    r = cli(base_store, "fsck")
    assert r.returncode == 0, r.stdout


def test_patch_after_fsync_then_kill_leaves_the_fsynced_version(base_store, tmp_path):
    m = tmp_path / "m"
    with mounted(base_store, m) as proc:
        p = m / "f.bin"
        with open(p, "wb") as f:
            f.write(b"a" * 100_000)
            f.flush()
            os.fsync(f.fileno())
            f.seek(10)
            f.write(b"XYZ")  # changes acknowledged bytes: a new version, never acknowledged
            f.flush()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            try:
                f.close()
            except OSError:
                pass
    with mounted(base_store, m):
        assert (m / "f.bin").read_bytes() == b"a" * 100_000


# ---- never wrong bytes ----

def _damage_record(store_path: Path, table: str, key: bytes, at: int = 0) -> None:
    """Flip one byte of a record's stored value, as a bad sector or a stray write would."""
    with Store(store_path) as store, store.env.begin(write=True) as txn:
        raw = bytearray(txn.get(key, db=store.db[table]))
        raw[at] ^= 0x5A
        txn.put(key, bytes(raw), db=store.db[table])


def test_a_damaged_file_record_is_an_error_naming_the_file_everywhere(base_store, models, tmp_path):
    with Store(base_store) as store, store.read() as txn:
        fid = inodes.resolve(store, txn, "base/minilm/tokenizer.json").content_id
    _damage_record(base_store, "files", u64key(fid))
    r = cli(base_store, "cat", "base/minilm/tokenizer.json")
    assert r.stdout == b"" and "base/minilm/tokenizer.json" in one_line_error(r)
    r = cli(base_store, "verify")  # names the file and goes on with the rest
    out = r.stdout.decode()
    assert r.returncode == 1 and "FAILED  base/minilm/tokenizer.json" in out and "8 ok, 1 failed" in out, out
    r = cli(base_store, "fsck", "--scrub")
    assert r.returncode == 1 and "damaged" in r.stdout.decode()
    r = cli(base_store, "ls")
    assert r.returncode == 1 and b"base/minilm/model.safetensors" in r.stdout and b"damaged" in r.stderr
    m = tmp_path / "m"
    with mounted(base_store, m) as proc:
        with pytest.raises(OSError) as e:
            (m / "base/minilm/tokenizer.json").read_bytes()
        assert e.value.errno == errno.EIO
        assert sha256(m / "base/minilm/model.safetensors") == sha256(models["minilm"] / "model.safetensors")
        assert proc.poll() is None


def test_fsck_reports_a_damaged_payload_key(base_store):
    with Store(base_store) as store, store.env.begin(write=True) as txn:
        txn.put(b"\xff" * 300, b"junk", db=store.db["payloads"])  # a key no chunk id can be
    r = cli(base_store, "fsck")
    assert r.returncode == 1 and "payload key of 300 bytes is damaged" in r.stdout.decode(), r
    assert b"Traceback" not in r.stderr


def test_a_damaged_branch_page_is_an_error_not_an_abort(base_store, monkeypatch):
    """A branch page's child link pointed back at itself: LMDB's cursor asserts (SIGABRT) when it
    meets a branch where a leaf must be; zipfs checks the trees before LMDB walks them."""
    seen: list[tuple[str, int, int]] = []

    class Recorder(datafile._Tree):
        def page(self, table: str, pg: int, kind: int) -> tuple[int, int]:
            seen.append((table, pg, kind))
            return super().page(table, pg, kind)

    monkeypatch.setattr(datafile, "_Tree", Recorder)
    with Store(base_store) as store:
        store.check_tree()
    root = next(pg for table, pg, kind in seen if table == "payloads" and kind == datafile.P_BRANCH)
    data = base_store / "lmdb/data.mdb"
    with open(data, "r+b") as f:
        f.seek(root * 4096 + 16 + 2)  # the offset of the page's second node
        node = int.from_bytes(f.read(2), "little")
        f.seek(root * 4096 + node)
        f.write(struct.pack("<HHH", root & 0xFFFF, root >> 16 & 0xFFFF, root >> 32))
    for args in (("fsck", "--scrub"), ("gc",), ("compact",), ("ls",), ("verify",)):
        r = cli(base_store, *args)
        assert r.returncode > 0, (args, r)  # an error, not a signal
        assert f"page {root} of the payloads table is damaged" in (r.stdout + r.stderr).decode(), (args, r)
        assert b"Traceback" not in r.stderr


def test_cat_refuses_a_negative_offset(base_store):
    one_line_error(cli(base_store, "cat", "base/minilm/config.json", "--offset", "-5"))
    one_line_error(cli(base_store, "cat", "base/minilm/config.json", "--length", "-1"))


def test_a_truncated_data_file_is_a_one_line_error_not_sigbus(base_store):
    data = base_store / "lmdb/data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    for args in (("ls",), ("verify",), ("cat", "base/minilm/config.json"), ("stats",), ("fsck",)):
        assert "truncated" in one_line_error(cli(base_store, *args))


# ---- no request kills the mount ----

def test_long_paths_and_long_names(tmp_path):
    m = tmp_path / "m"
    with mounted(tmp_path / "store", m) as proc:
        deep = m / ("a" * 255) / "c" / ("b" * 255) / ("d" * 255) / ("e" * 255)
        os.makedirs(deep)
        (deep / ("f" * 255)).write_bytes(b"deep")
        assert (deep / ("f" * 255)).read_bytes() == b"deep"
        with pytest.raises(OSError) as e:
            (m / ("x" * 256)).write_bytes(b"")
        assert e.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as e:
            os.mkdir(m / ("y" * 256))
        assert e.value.errno == errno.ENAMETOOLONG
        os.rename(m / ("a" * 255), m / "short")
        assert (m / "short/c" / ("b" * 255) / ("d" * 255) / ("e" * 255) / ("f" * 255)).read_bytes() == b"deep"
        assert proc.poll() is None
    r = cli(tmp_path / "store", "ls")
    assert r.returncode == 0 and ("f" * 255).encode() in r.stdout


# ---- open files keep their version ----

def test_gc_while_a_removed_file_is_read_through_a_held_descriptor(base_store, models, tmp_path):
    m = tmp_path / "m"
    want = (models["minilm"] / "model.safetensors").read_bytes()
    with mounted(base_store, m):
        held = open(m / "base/minilm/model.safetensors", "rb")  # noqa: SIM115 - held across rm and gc
        other = open(m / "base/minilm/tokenizer.json", "rb")  # noqa: SIM115
        assert cli(base_store, "rm", "base/minilm/model.safetensors").returncode == 0
        os.unlink(m / "base/minilm/tokenizer.json")
        r = cli(base_store, "gc")
        assert r.returncode == 0 and b"still open" in r.stdout, r.stdout
        got = hashlib.sha256()
        for i in range(10**6):
            block = held.read(3 * MiB + 17)
            if not block:
                break
            got.update(block)
            if i % 8 == 0:
                assert cli(base_store, "gc").returncode == 0
        assert got.hexdigest() == hashlib.sha256(want).hexdigest()
        assert other.read() == (models["minilm"] / "tokenizer.json").read_bytes()
        held.close()
        other.close()
        wait_for(lambda: b"still open" not in cli(base_store, "gc").stdout, 10, "the pins to go")
    r = cli(base_store, "fsck")
    assert r.returncode == 0 and b" 7 file versions" in r.stdout, r.stdout


def test_an_overwritten_file_keeps_its_old_version_for_open_readers(base_store, models, tmp_path):
    m = tmp_path / "m"
    old = (models["minilm"] / "tokenizer.json").read_bytes()
    with mounted(base_store, m):
        held = open(m / "base/minilm/tokenizer.json", "rb")  # noqa: SIM115
        (m / "new.json").write_bytes(b"{}")
        os.rename(m / "new.json", m / "base/minilm/tokenizer.json")  # replaces it
        cfg = open(m / "base/minilm/config.json", "rb")  # noqa: SIM115
        assert cli(base_store, "ingest", str(models["sre"] / "config.json"), "--name",
                   "base/minilm/config.json").returncode == 0  # replaced from another process
        assert cli(base_store, "gc").returncode == 0
        assert held.read() == old
        assert cfg.read() == (models["minilm"] / "config.json").read_bytes()
        held.close()
        cfg.close()
        assert (m / "base/minilm/tokenizer.json").read_bytes() == b"{}"
        wait_for(lambda: (m / "base/minilm/config.json").read_bytes() ==
                 (models["sre"] / "config.json").read_bytes(), 5, "the new name to show")


def test_writes_through_one_descriptor_are_seen_by_another_at_once(base_store, models, tmp_path):
    m = tmp_path / "m"
    with mounted(base_store, m):
        p = m / "base/minilm/tokenizer.json"
        reader = os.open(p, os.O_RDONLY)  # opened before the write
        before = os.pread(reader, 100, 0)
        writer = os.open(p, os.O_WRONLY)
        os.pwrite(writer, b"CHANGED", 3)
        assert os.pread(reader, 100, 0) == before[:3] + b"CHANGED" + before[10:]
        os.fsync(writer)
        os.close(writer)
        sync(base_store, m)  # ingested meanwhile: the reader still sees the same bytes
        assert os.pread(reader, 100, 0) == before[:3] + b"CHANGED" + before[10:]
        os.close(reader)


def test_rewriting_in_place_while_others_stat_and_open_it(base_store, tmp_path):
    m = tmp_path / "m"
    errors: list[str] = []
    stop = threading.Event()
    with mounted(base_store, m):
        p = m / "busy.bin"
        p.write_bytes(b"0" * 4096)

        def poke() -> None:
            while not stop.is_set():
                try:
                    os.stat(p)
                    with open(p, "rb") as f:
                        f.read(10)
                except OSError as e:
                    errors.append(os.strerror(e.errno))

        threads = [threading.Thread(target=poke) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 8
        i = 0
        while time.monotonic() < deadline:
            i += 1
            with open(p, "r+b") as f:
                f.seek(i % 4000)
                f.write(b"x")
            if i % 7 == 0:
                time.sleep(0.05)  # let its ingest commit meanwhile
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:10]


def test_cli_rm_of_a_file_open_for_writing(base_store, tmp_path):
    m = tmp_path / "m"
    with mounted(base_store, m):
        with open(m / "w.bin", "wb") as f:
            f.write(b"x" * 1000)
            f.flush()
            os.fsync(f.fileno())
            assert cli(base_store, "rm", "w.bin").returncode == 0
            f.write(b"y" * 1000)  # writes to a removed file succeed, as POSIX says
        # close succeeded; nothing of it is left behind
        sync(base_store, m)
        assert not (m / "w.bin").exists()
    assert not os.listdir(base_store / "staging")
    assert cli(base_store, "fsck").returncode == 0


# ---- permissions ----

def test_modes_owners_and_umask_are_kept_and_the_store_is_private(base_store, tmp_path):
    m = tmp_path / "m"
    with mounted(base_store, m):
        p = m / "f.txt"
        p.write_bytes(b"x")
        os.chmod(p, 0o640)
        os.chown(p, 1234, 5678)
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 5678)
        old = os.umask(0o077)
        try:
            (m / "private.txt").write_bytes(b"secret")
            os.mkdir(m / "private.d")
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(m / "private.txt").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(m / "private.d").st_mode) == 0o700
    with mounted(base_store, m):  # durable
        st = os.stat(m / "f.txt")
        assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 5678)
    for path, mode in ((base_store, 0o700), (base_store / "lmdb", 0o700),
                       (base_store / "lmdb/data.mdb", 0o600)):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path


@pytest.fixture(scope="module")
def other_user() -> Iterator[str]:
    """A real second local user (created for these tests, removed after them)."""
    name = "zipfs-test-other"
    made = subprocess.run(["id", name], capture_output=True).returncode != 0
    if made:
        subprocess.run(["useradd", "--no-create-home", "--no-user-group", "--shell", "/bin/sh", name],
                       check=True)
    yield name
    if made:
        subprocess.run(["userdel", name], capture_output=True)


def test_allow_other_shares_what_the_modes_say_and_nothing_else(base_store, other_user, tmp_path):
    top = Path(tempfile.mkdtemp(prefix="zipfs-other-", dir="/tmp"))  # a path the other user may walk
    os.chmod(top, 0o755)
    m = top / "m"
    try:
        _check_other_user(base_store, m, other_user, tmp_path)
    finally:
        unmount(m)
        shutil.rmtree(top, ignore_errors=True)


def _check_other_user(base_store: Path, m: Path, other_user: str, tmp_path: Path) -> None:
    with mounted(base_store, m, "--allow-other", log=tmp_path / "mount.log"):
        (m / "public.txt").write_bytes(b"everyone")
        (m / "secret.txt").write_bytes(b"root only")
        os.chmod(m / "public.txt", 0o644)
        os.chmod(m / "secret.txt", 0o600)

        def as_other(*cmd: str) -> subprocess.CompletedProcess:
            return subprocess.run(["runuser", "-u", other_user, "--", *cmd], capture_output=True)

        assert as_other("cat", str(m / "public.txt")).stdout == b"everyone"
        r = as_other("cat", str(m / "secret.txt"))
        assert r.returncode != 0 and b"Permission denied" in r.stderr
        r = as_other("sh", "-c", f"echo x > {m / 'public.txt'}")
        assert r.returncode != 0 and (m / "public.txt").read_bytes() == b"everyone"
        assert as_other("cat", str(m / "base/minilm/config.json")).returncode == 0  # kept 0644 at ingest


def test_ingest_never_follows_a_symlink_out_of_the_tree(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "x").symlink_to("/etc/shadow")
    (src / "loop").symlink_to("loop")
    os.mkfifo(src / "fifo")
    store = tmp_path / "store"
    r = cli(store, "ingest", str(src), "--name", "m", timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"outside" in r.stdout and b"skipped" in r.stdout and b"FIFO" in r.stdout
    ls = cli(store, "ls").stdout.decode()
    assert "m/x -> /etc/shadow" in ls and "m/loop -> loop" in ls and "fifo" not in ls
    shadow = Path("/etc/shadow").read_bytes()
    with Store(store) as s, s.read() as txn:
        assert all(s.file(txn, n.content_id).size != len(shadow) for _, n in inodes.walk(s, txn)
                   if n.is_reg and n.content)
    r = cli(store, "ingest", str(src / "fifo"), "--name", "f", timeout=20)  # never blocks
    assert "FIFO" in one_line_error(r)


def test_export_never_writes_outside_its_directory(base_store, tmp_path):
    with Store(base_store) as store:  # a crafted entry, as a hostile store would have
        def op(txn) -> None:
            d = inodes.resolve(store, txn, "base")
            store.put(txn, "dirents", u64key(d.ino) + b"a/../../../../tmp/PWNED.json",
                      u64key(inodes.resolve(store, txn, "base/minilm/config.json").ino))
        store.writer.call(op)
    out = tmp_path / "out"
    r = cli(base_store, "export", "base", str(out))
    assert r.returncode == 1 and b"PWNED" in r.stderr
    assert not Path("/tmp/PWNED.json").exists() and not (tmp_path / "PWNED.json").exists()
    assert (out / "minilm/config.json").exists()
    (out / "minilm").rename(out / "elsewhere")  # a symlink planted where export will write
    (out / "minilm").symlink_to(tmp_path / "victim")
    (tmp_path / "victim").mkdir()
    r = cli(base_store, "export", "base", str(out))
    assert r.returncode == 1 and not os.listdir(tmp_path / "victim")


def test_export_keeps_long_names_links_empty_dirs_and_modes(tmp_path):
    m = tmp_path / "m"
    store = tmp_path / "store"
    with mounted(store, m):
        d = m / "model"
        (d / "empty").mkdir(parents=True)
        (d / ("n" * 255)).write_bytes(b"long")
        os.chmod(d / ("n" * 255), 0o600)
        (d / "link").symlink_to("n" * 255)
        os.utime(d / ("n" * 255), ns=(10**18, 10**18))
        sync(store, m)
    out = tmp_path / "out"
    r = cli(store, "export", "model", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / ("n" * 255)).read_bytes() == b"long" and os.readlink(out / "link") == "n" * 255
    assert (out / "empty").is_dir() and stat.S_IMODE(os.stat(out / ("n" * 255)).st_mode) == 0o600
    assert os.stat(out / ("n" * 255)).st_mtime_ns == 10**18


# ---- disk full ----

def test_failed_ingest_on_a_full_disk_frees_its_chunks_and_gc_still_works(models, small_fs):
    store = small_fs / "store"
    assert cli(store, "ingest", str(models["sre"] / "vocab.txt"), "--name", "v.txt").returncode == 0
    r = cli(store, "ingest", str(models["sre"] / "model.safetensors"), "--name", "big.safetensors")
    assert "no space left" in one_line_error(r).lower()
    r = cli(store, "fsck")
    assert r.returncode == 0 and b"(0 unreferenced)" in r.stdout, r.stdout
    fill = small_fs / "fill"
    with open(fill, "wb") as f:  # leave nothing at all
        try:
            while True:
                f.write(b"\0" * MiB)
        except OSError:
            pass
    assert cli(store, "rm", "v.txt").returncode == 0
    r = cli(store, "gc")
    assert r.returncode == 0 and b"freed 1 removed file versions" in r.stdout, r.stdout + r.stderr
    fill.unlink()
    assert cli(store, "fsck").returncode == 0


# ---- everyday copies ----

def test_cp_a_and_rsync_a_keep_modes_and_mtimes(models, tmp_path):
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(models["sre"]), str(src)], check=True)
    os.chmod(src / "config.json", 0o600)
    os.utime(src / "vocab.txt", ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    (src / "link.txt").symlink_to("vocab.txt")
    m = tmp_path / "m"
    store = tmp_path / "store"
    with mounted(store, m):
        for tool, dest in ((["cp", "-a"], "cp"), (["rsync", "-a"], "rsync")):
            r = subprocess.run([*tool, f"{src}/", str(m / dest)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            for f in src.rglob("*"):
                got = m / dest / f.relative_to(src)
                a, b = os.lstat(f), os.lstat(got)
                assert (a.st_mode, a.st_mtime_ns) == (b.st_mode, b.st_mtime_ns), got
                if f.is_file() and not f.is_symlink():
                    assert sha256(got) == sha256(f)
        sync(store, m)
        assert os.stat(m / "rsync/vocab.txt").st_mtime_ns == 1_500_000_000 * 10**9
    assert cli(store, "verify").returncode == 0


# ---- smaller ones ----

def test_user_xattrs_and_state_xattrs_agree(base_store, tmp_path):
    m = tmp_path / "m"
    with mounted(base_store, m):
        p = m / "x.bin"
        p.write_bytes(os.urandom(4 * MiB))
        os.setxattr(p, "user.foo", b"bar")
        assert os.getxattr(p, "user.foo") == b"bar"
        for _ in range(50):  # while it is being ingested and after: what is listed can be read
            for name in os.listxattr(p):
                os.getxattr(p, name)
            assert os.getxattr(p, "user.zipfs.state") in (b"staged", b"ingesting", b"stored")
            time.sleep(0.02)
        sync(base_store, m)
        assert os.listxattr(p) == ["user.foo"]  # the mount's own are read by name, not listed
        assert len(os.getxattr(p, "user.zipfs.sha256")) == 64
        os.removexattr(p, "user.foo")
        assert "user.foo" not in os.listxattr(p)
        with pytest.raises(OSError) as e:
            os.setxattr(p, "user.zipfs.state", b"x")
        assert e.value.errno == errno.EPERM


def test_xattrs_set_before_a_remount_are_read_after_it(base_store, tmp_path):
    """The writable mount answers getxattr of a file without xattrs from memory (the kernel asks
    for security.capability before every write): what an earlier mount set must still be read."""
    m = tmp_path / "m"
    with mounted(base_store, m):
        (m / "a").write_bytes(b"a")
        (m / "b").write_bytes(b"b")
        os.setxattr(m / "a", "user.k", b"v")
    for _ in range(2):
        with mounted(base_store, m):
            assert os.getxattr(m / "a", "user.k") == b"v"
            with pytest.raises(OSError) as e:
                os.getxattr(m / "b", "user.k")
            assert e.value.errno == errno.ENODATA
            with open(m / "b", "ab") as f:  # a write still works (and its capability check)
                f.write(b"more")
            os.setxattr(m / "b", "user.k", b"w")
            assert os.getxattr(m / "b", "user.k") == b"w"
            os.removexattr(m / "b", "user.k")


def test_ingest_of_a_large_sparse_file_uses_bounded_memory(tmp_path):
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(2 << 30)
        f.seek(1 << 30)
        f.write(b"island")
    store = tmp_path / "store"
    proc = subprocess.Popen(zipfs_cmd(store, "ingest", str(sparse), "--name", "s"), stdout=subprocess.DEVNULL)
    peak_kb = 0  # VmHWM of the ingest itself (rusage would count the forked test process it began as)
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            pass
        time.sleep(0.05)
    assert proc.returncode == 0
    assert 0 < peak_kb < 400 * 1024, peak_kb  # a 2 GiB file in well under 400 MiB
    r = cli(store, "cat", "s", "--offset", str(1 << 30), "--length", "6")
    assert r.stdout == b"island"


# ---- recovery and acknowledgement, found by the second attack ----

def _kill(proc: subprocess.Popen, *fds: int) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone


def test_a_created_file_never_closed_is_gone_by_every_name_after_a_crash(tmp_path):
    store, m = tmp_path / "store", tmp_path / "m"
    with mounted(store, m) as proc:
        fd = os.open(m / "new", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"never acknowledged")
        os.link(m / "new", m / "alias")
        _kill(proc, fd)
    with mounted(store, m):
        assert not (m / "new").exists() and not (m / "alias").exists()
    assert cli(store, "fsck").returncode == 0


def test_fsync_through_any_descriptor_acknowledges_the_file(tmp_path):
    store, m = tmp_path / "store", tmp_path / "m"
    new = b"new contents, fsynced\n" * 1000
    with mounted(store, m) as proc:
        (m / "f").write_bytes(b"old")
        sync(store, m)
        fd = os.open(m / "f", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, new)
        ro = os.open(m / "f", os.O_RDONLY)
        os.fsync(ro)  # Linux filesystems make the file durable, whichever descriptor asks
        os.close(ro)
        _kill(proc, fd)
    with mounted(store, m):
        assert (m / "f").read_bytes() == new


def test_a_file_whose_recorded_name_went_away_is_still_ingested(tmp_path):
    store, m = tmp_path / "store", tmp_path / "m"
    with mounted(store, m):
        os.mkdir(m / "d1")
        os.mkdir(m / "d2")
        (m / "d1/x").write_bytes(b"one")
        sync(store, m)
        os.link(m / "d1/x", m / "d2/y")  # the newest name is the one the inode records
        os.unlink(m / "d2/y")
        os.rmdir(m / "d2")
        (m / "d1/x").write_bytes(b"two, written after the link went")
        sync(store, m)
        assert os.getxattr(m / "d1/x", "user.zipfs.state") == b"stored"
    assert cli(store, "cat", "d1/x").stdout == b"two, written after the link went"
    assert cli(store, "fsck").returncode == 0


def test_recovery_of_a_long_multibyte_name_lets_the_mount_start(tmp_path):
    store, m = tmp_path / "store", tmp_path / "m"
    name = "é" * 127  # 254 bytes: a valid name, longer than 127 characters
    with mounted(store, m) as proc:
        fd = os.open(m / name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"never closed")
        _kill(proc, fd)
    with mounted(store, m):
        assert not (m / name).exists()
    kept = os.listdir(store / "lost+found")
    assert len(kept) == 1 and len(kept[0].encode()) <= 255
    assert (store / "lost+found" / kept[0]).read_bytes() == b"never closed"


def test_a_failed_write_rolls_back_to_what_was_acknowledged(tmp_path):
    store, m = tmp_path / "store", tmp_path / "m"
    with mounted(store, m):
        p = m / "x"
        p.write_bytes(b"acknowledged\n")
        sync(store, m)
        fd = os.open(p, os.O_RDWR)
        os.pwrite(fd, b"x" * 13, 0)  # a new version, then acknowledged
        os.fsync(fd)
        os.pwrite(fd, b"UNACKED", 100)
        with pytest.raises(OSError):
            os.pwrite(fd, b"B", 1 << 50)  # beyond what the staging filesystem holds
        with pytest.raises(OSError):
            os.close(fd)  # the writer hears of the failure
        wait_for(lambda: p.read_bytes() == b"x" * 13, 5, "the acknowledged version to show again")
        p.write_bytes(b"a later rewrite\n")  # the file is not poisoned for later writers
        sync(store, m)
        assert os.getxattr(p, "user.zipfs.state") == b"stored"
    assert cli(store, "cat", "x").stdout == b"a later rewrite\n"


def test_a_failed_truncate_by_path_leaves_nothing_behind(base_store, tmp_path):
    m = tmp_path / "m"
    with mounted(base_store, m):
        p = m / "base/minilm/config.json"
        before = p.read_bytes()
        for _ in range(3):
            with pytest.raises(OSError):
                os.truncate(p, 1 << 50)  # beyond what the staging filesystem holds (ext4: EFBIG)
        assert p.read_bytes() == before
        assert not os.listdir(base_store / "staging")  # no copy of the file left per attempt
    assert not (base_store / "lost+found").exists()


def test_cli_rm_of_a_queued_file_is_not_a_failure(models, tmp_path):
    store, m = tmp_path / "store", tmp_path / "m"
    with mounted(store, m, "--ingest-workers", "1"):
        os.mkdir(m / "ft")
        files = [open(m / f"ft/m{i}.bin", "wb") for i in range(3)]  # noqa: SIM115
        for f in files:
            f.write(os.urandom(24 * MiB))
        for f in files:
            f.close()  # three ingests queued at once, one worker
        assert cli(store, "rm", "ft/m2.bin").returncode == 0
        sync(store, m)  # exits 0: a removed file is gone, not failed
        assert sorted(os.listdir(m / "ft")) == ["m0.bin", "m1.bin"]
    assert not os.listdir(store / "staging")
    assert cli(store, "fsck").returncode == 0


def test_compact_is_refused_while_the_store_is_open_anywhere(base_store):
    with Store(base_store):
        err = one_line_error(cli(base_store, "compact"))
        assert "in use" in err
    assert cli(base_store, "compact").returncode == 0


def test_a_file_swapped_for_a_link_during_ingest_is_refused(tmp_path):
    from zipfs.errors import ZipfsError
    from zipfs.ingest.plan import open_regular
    secret, f = tmp_path / "secret", tmp_path / "f"
    secret.write_bytes(b"not yours")
    f.write_bytes(b"listed")
    listed = os.lstat(f)
    f.rename(tmp_path / "kept")  # kept: its inode number is not reused below
    f.symlink_to(secret)
    with pytest.raises(ZipfsError, match="f"):
        open_regular(f, listed)
    f.unlink()
    f.write_bytes(b"another file, same name")
    with pytest.raises(ZipfsError, match="replaced"):
        open_regular(f, listed)


def test_files_copied_out_with_their_xattrs_go_back_in(base_store, tmp_path):
    m, out = tmp_path / "m", tmp_path / "out"
    with mounted(base_store, m):
        for tool in (["cp", "-a"], ["rsync", "-aX"]):
            shutil.rmtree(out, ignore_errors=True)
            r = subprocess.run([*tool, f"{m}/base/minilm/", str(out)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            r = subprocess.run([*tool, f"{out}/", str(m / "back")], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert sha256(m / "back/config.json") == sha256(out / "config.json")


def test_a_read_only_mount_never_mixes_two_versions_of_a_rewritten_file(base_store, tmp_path):
    """The writing mount rewrites a file in place (the same inode) while a second, read-only
    mount has it open: once the second mount learns of it (a stat, a lookup, an open), every
    handle there reads the new version, with its size, as the writing mount's own handles do
    (the kernel keeps one page cache per inode: two versions behind it would mix)."""
    import mmap
    w, r = tmp_path / "w", tmp_path / "r"
    with mounted(base_store, w), mounted(base_store, r, "--read-only"):
        (w / "x").write_bytes(b"A" * 3 * MiB)
        sync(base_store, w)
        wait_for(lambda: (r / "x").exists(), 5, "the file to show in the second mount")
        held = os.open(r / "x", os.O_RDONLY)
        try:
            assert os.pread(held, 8 * MiB, 0) == b"A" * 3 * MiB
            for new in (b"B" * MiB, b"C" * 150, b"D" * 4 * MiB):
                (w / "x").write_bytes(new)
                sync(base_store, w)
                time.sleep(1.1)  # past the attribute timeout
                assert os.stat(r / "x").st_size == len(new)
                assert os.pread(held, 8 * MiB, 0) == new  # the held handle reads it whole
                fd = os.open(r / "x", os.O_RDONLY)
                assert os.fstat(fd).st_size == len(new)
                for flags in (mmap.MAP_SHARED, mmap.MAP_PRIVATE):
                    with mmap.mmap(fd, len(new), flags, mmap.PROT_READ) as mm:
                        os.pread(held, 8 * MiB, 0)
                        assert mm[:] == new
                os.close(fd)
        finally:
            os.close(held)


def test_directories_nested_deeper_than_a_path_can_name(base_store, tmp_path):
    m = tmp_path / "m"
    with mounted(base_store, m):
        fd = os.open(m, os.O_RDONLY)
        try:
            for _ in range(2100):  # one at a time, as mkdirat allows: more than PATH_MAX / 2 levels
                os.mkdir("d", dir_fd=fd)
                fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
                os.close(old)
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
                f.write(b"deep")
            os.mkdir("a", dir_fd=fd)
            os.rename("a", "b", src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)
        sync(base_store, m)
    for args in (("ls",), ("verify",), ("stats",), ("fsck",)):
        r = cli(base_store, *args)
        assert r.returncode == 0, (args, r.stderr)
    assert b"/d/f" in cli(base_store, "ls").stdout
    assert cli(base_store, "rm", "d").returncode == 0


def test_rename_flags_it_cannot_honour_are_refused(tmp_path):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    m = tmp_path / "m"
    with mounted(tmp_path / "store", m):
        (m / "a").write_bytes(b"x")
        at_fdcwd, rename_whiteout = -100, 4
        rc = libc.renameat2(at_fdcwd, bytes(m / "a"), at_fdcwd, bytes(m / "b"), rename_whiteout)
        assert rc == -1 and ctypes.get_errno() == errno.EINVAL
        assert (m / "a").read_bytes() == b"x"


def test_a_staged_version_cut_on_disk_reads_as_an_error(tmp_path):
    store, m = tmp_path / "store", tmp_path / "m"
    data = os.urandom(2 * MiB)
    with mounted(store, m, "--ingest-workers", "1") as proc:
        fd = os.open(m / "a.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.fsync(fd)  # acknowledged; queued for ingest only at its close, which never comes
        _kill(proc, fd)
    (staged,) = (store / "staging").iterdir()
    os.truncate(staged, MiB)  # acknowledged bytes lost under zipfs
    with mounted(store, m):
        with pytest.raises(OSError) as e:
            (m / "a.bin").read_bytes()
        assert e.value.errno == errno.EIO


def test_usage_errors_are_one_line(tmp_path):
    for args in (("mount", str(tmp_path / "m"), "--workers", "-3"), ("cat",), ("nosuch",),
                 ("mount", str(tmp_path / "m"), "--ingest-workers", "x")):
        err = one_line_error(cli(tmp_path / "store", *args))
        assert "--help" in err


def test_a_sparse_file_counts_what_it_takes_against_the_staging_limit(tmp_path):
    store, m = tmp_path / "store", tmp_path / "m"
    with mounted(store, m, "--staging-limit", "16M"):
        (m / "big").write_bytes(b"")
        os.truncate(m / "big", 256 * MiB)  # 256 MiB that take no disk
        t0 = time.monotonic()
        (m / "small").write_bytes(os.urandom(MiB))  # not held back until the sparse one is ingested
        assert time.monotonic() - t0 < 5
        assert json.loads(os.getxattr(m, "user.zipfs.stats"))["backpressure_waits"] == 0
        sync(store, m)
        assert os.stat(m / "big").st_size == 256 * MiB


def test_ingest_refuses_a_file_that_holds_more_than_its_size_says(tmp_path):
    store = tmp_path / "store"
    err = one_line_error(cli(store, "ingest", "/proc/self/mountinfo", "--name", "mi"))  # st_size 0
    assert "more than its size says" in err
    assert cli(store, "cat", "mi").returncode != 0  # nothing stored under the name


def test_readers_in_a_read_only_mount_while_the_writer_rewrites_every_20_ms(tmp_path):
    """Many switches, many handles: no read fails and no mapped reader dies (a handle left on a
    version already let go read a staging file the ingest had removed: ENOENT, SIGBUS)."""
    store, w, r = tmp_path / "store", tmp_path / "w", tmp_path / "r"
    size = 65536
    child = ("import mmap, os, sys, time\n"
             "end = time.time() + float(sys.argv[2])\n"
             "while time.time() < end:\n"
             "    fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "    with mmap.mmap(fd, 65536, prot=mmap.PROT_READ) as m:\n"
             "        assert len(bytes(m[:])) == 65536\n"
             "    os.close(fd)\n")
    errors: list[str] = []
    with mounted(store, w), mounted(store, r, "--read-only", log=tmp_path / "r.log"):
        (w / "f").write_bytes(b"\0" * size)
        sync(store, w)
        wait_for(lambda: (r / "f").exists(), 5, "the file to show in the second mount")
        end = time.monotonic() + 6
        mapper = subprocess.Popen([sys.executable, "-c", child, str(r / "f"), "6"])

        def reader() -> None:
            while time.monotonic() < end:
                try:
                    fd = os.open(r / "f", os.O_RDONLY)
                    try:
                        if len(os.pread(fd, size, 0)) != size:
                            errors.append("short read")
                        os.stat(r / "f")
                    finally:
                        os.close(fd)
                except OSError as e:
                    errors.append(str(e))

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        v = 0
        while time.monotonic() < end:
            v += 1
            (w / "f").write_bytes(v.to_bytes(8, "little") * (size // 8))  # the same inode, rewritten
            time.sleep(0.02)
        for t in threads:
            t.join()
        assert mapper.wait(30) == 0  # not killed by SIGBUS
    assert not errors, errors[:5]
    assert " ERROR " not in (tmp_path / "r.log").read_text()
