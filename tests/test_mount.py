"""The real FUSE mount: byte-exact files, safetensors and transformers through it, concurrency,
EIO on corruption, signals, background mode and fstab syntax."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import subprocess
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import fetch_models
from conftest import sha256
from zipfs.fs.process import ROOT, mounted, unmount, wait_for, zipfs_cmd
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.model import ingest_model
from zipfs.store.lmdb_store import Store
from zipfs.store.records import u64key

ROLES = ("minilm", "gt-minilm", "sre")


@pytest.fixture(scope="module")
def family_store(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    models = fetch_models.fetch(list(ROLES))
    path = tmp_path_factory.mktemp("mountstore") / "store"
    with Store(path) as store, Ingester(store) as ing:
        for role in ROLES:
            ingest_model(ing, models[role], role)
    return path, models


@pytest.fixture(scope="module")
def mnt(family_store, tmp_path_factory):
    store, _ = family_store
    m = tmp_path_factory.mktemp("mnt") / "m"
    with mounted(store, m, "--cache-size", "256M"):
        yield m


def originals(models) -> list[tuple[str, Path]]:
    return [(f"{role}/{f.relative_to(models[role])}", f)
            for role in ROLES for f in sorted(models[role].rglob("*")) if f.is_file()]


def test_every_file_is_byte_exact(mnt, family_store):
    _, models = family_store
    files = originals(models)
    assert sorted(os.listdir(mnt)) == sorted(ROLES)
    for rel, orig in files:
        assert os.stat(mnt / rel).st_size == orig.stat().st_size
        assert sha256(mnt / rel) == sha256(orig), rel
    out = subprocess.run(["sha256sum", str(mnt / "sre/model.safetensors")], capture_output=True, text=True)
    assert out.stdout.split()[0] == sha256(models["sre"] / "model.safetensors")


def test_safe_open_mmap_and_pread_match_the_original(mnt, family_store):
    _, models = family_store
    orig = models["sre"] / "model.safetensors"
    with safe_open(orig, "numpy") as ref:
        names = list(ref.keys())
        expected = {n: ref.get_tensor(n) for n in names}
    for backend in ("mmap", "pread"):
        with safe_open(mnt / "sre/model.safetensors", "numpy", backend=backend) as f:
            assert list(f.keys()) == names
            for n in names:
                assert np.array_equal(f.get_tensor(n), expected[n]), (backend, n)


def embed(path: Path) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(["pod init container keeps crashing", "disk full on the database host"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    return ((out * mask).sum(1) / mask.sum(1)).numpy()


def test_transformers_loads_the_fine_tune_from_the_mount(mnt, family_store):
    _, models = family_store
    assert np.array_equal(embed(mnt / "sre"), embed(models["sre"]))


def _check_ranges(path: str, orig: str, seed: int, n: int = 60) -> int:
    rng = random.Random(seed)
    size = os.path.getsize(orig)
    with open(path, "rb") as f, open(orig, "rb") as g:
        for _ in range(n):
            off = rng.randrange(size)
            length = rng.choice([1, 4096, 131072, 1 << 20, 3 << 20])
            f.seek(off)
            g.seek(off)
            if f.read(length) != g.read(length):
                return 1
    return 0


def test_concurrent_readers_threads_and_processes(mnt, family_store):
    _, models = family_store
    pairs = [(str(mnt / f"{r}/model.safetensors"), str(models[r] / "model.safetensors")) for r in ROLES]
    errors: list[int] = []
    threads = [threading.Thread(target=lambda i=i: errors.append(_check_ranges(*pairs[i % 3], seed=i)))
               for i in range(8)]
    for t in threads:
        t.start()
    with ProcessPoolExecutor(4) as pool:
        procs = [pool.submit(_check_ranges, *pairs[i % 3], 100 + i) for i in range(4)]
        errors += [p.result() for p in procs]
    for t in threads:
        t.join()
    assert errors == [0] * 12


def test_mount_stats(mnt):
    assert not os.path.exists(mnt / "sre/nope.json")
    stats = json.loads(subprocess.run(zipfs_cmd(Path("/nonexistent"), "stats", "--mount", str(mnt), "--json"),
                                      capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    assert stats["reads"] > 0 and stats["cache_capacity"] == 256 << 20
    assert os.getxattr(mnt / "sre/model.safetensors", "user.zipfs.state") == b"stored"
    st = os.statvfs(mnt)
    assert st.f_blocks >= st.f_bfree > 0


def test_corrupt_chunk_gives_eio_and_the_rest_still_reads(family_store, tmp_path):
    store_path, models = family_store
    with Store(store_path) as store, store.read() as txn:
        rec = store.file_at(txn, "sre/tokenizer.json")
        cid = int(rec.chunk_ids[0])
        original = bytes(store.payload(txn, cid))
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    with Store(store_path) as store, store.env.begin(write=True) as txn:
        txn.put(u64key(cid), bytes(damaged), db=store.db["payloads"])
    try:
        log = tmp_path / "eio.log"
        with mounted(store_path, tmp_path / "m", log=log):
            with pytest.raises(OSError) as e:
                (tmp_path / "m/sre/tokenizer.json").read_bytes()
            assert e.value.errno == errno.EIO
            assert sha256(tmp_path / "m/sre/model.safetensors") == sha256(models["sre"] / "model.safetensors")
            assert sha256(tmp_path / "m/minilm/tokenizer.json") == sha256(models["minilm"] / "tokenizer.json")
        assert f"EIO reading sre/tokenizer.json at offset 0 (chunk {cid})" in log.read_text()
    finally:
        with Store(store_path) as store, store.env.begin(write=True) as txn:
            txn.put(u64key(cid), original, db=store.db["payloads"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(family_store, tmp_path, sig):
    store, _ = family_store
    m = tmp_path / "m"
    with mounted(store, m) as proc:
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(m)
        os.listdir(m)  # no "Transport endpoint is not connected"


def test_background_mount_fstab_syntax_and_umount(family_store, tmp_path):
    store, models = family_store
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    m = tmp_path / "bg"
    m.mkdir()
    try:
        r = subprocess.run(zipfs_cmd(store, "mount", str(m), "--log-file", str(tmp_path / "bg.log")),
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(m)  # mounted by the time the command returned
        assert sha256(m / "minilm/config.json") == sha256(models["minilm"] / "config.json")
        r = subprocess.run(zipfs_cmd(store, "mount", str(m)), env=env, capture_output=True, text=True)
        assert r.returncode == 1 and "already a mount point" in r.stderr
        assert subprocess.run(zipfs_cmd(store, "umount", str(m)), env=env).returncode == 0
        wait_for(lambda: not os.path.ismount(m), 10, "the unmount")
        # the form mount.fuse3 uses for fstab entries: zipfs STORE MNT -o opts
        r = subprocess.run([*zipfs_cmd(store)[:3], str(store), str(m), "-o", "ro,cache_size=64M,nofail"],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(m)
    finally:
        unmount(m)
    # a new user starts with an empty mount and copies models in
    r = subprocess.run(zipfs_cmd(tmp_path / "new", "mount", str(m)), env=env, capture_output=True, text=True)
    try:
        assert r.returncode == 0, r.stderr
        assert os.listdir(m) == []
        (m / "x.json").write_text("{}")
        assert (m / "x.json").read_text() == "{}"
    finally:
        unmount(m)
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    r = subprocess.run(zipfs_cmd(tmp_path / "nostore", "mount", str(m), "--read-only"), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no zipfs store" in r.stderr


def test_a_non_empty_mount_point_is_refused_unless_nonempty(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    m = tmp_path / "m"
    m.mkdir()
    (m / ".hidden").write_text("mine")
    for fg in ([], ["--foreground"]):
        r = subprocess.run(zipfs_cmd(tmp_path / "store", "mount", str(m), *fg), env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "is not empty" in r.stderr and "--nonempty" in r.stderr
        assert not os.path.ismount(m) and os.listdir(m) == [".hidden"]
    try:
        r = subprocess.run(zipfs_cmd(tmp_path / "store", "mount", str(m), "--nonempty"), env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(m) and os.listdir(m) == []  # a new, empty store over the hidden file
    finally:
        unmount(m)
    assert (m / ".hidden").read_text() == "mine"


def test_a_link_to_a_live_mount_and_a_store_inside_the_mount_point_are_refused(tmp_path):
    """ismount does not follow links: a second mount through a link to a live one stacked two
    mounts; a store created inside its own mount point would be hidden by the mount."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    m, link, inner = tmp_path / "m", tmp_path / "link", tmp_path / "inner"
    link.symlink_to(m)
    inner.mkdir()

    def mount(store: Path, at: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(zipfs_cmd(store, "mount", str(at), *extra), env=env, capture_output=True,
                              text=True, timeout=60)

    r = mount(inner / "store", inner)
    assert r.returncode == 1 and "inside mount point" in r.stderr and not os.path.ismount(inner), r.stderr
    assert os.listdir(inner) == []  # no store was created there
    with mounted(tmp_path / "s1", m):
        for extra in ([], ["--nonempty"]):
            r = mount(tmp_path / "s2", link, *extra)
            assert r.returncode == 1 and "already a mount point" in r.stderr, r.stderr
        assert sum(line.split()[1] == str(m) for line in Path("/proc/mounts").read_text().splitlines()) == 1


def test_systemd_notify_ready(family_store, tmp_path):
    """Under systemd (Type=notify) the mount sends READY=1 once it is live."""
    import socket

    store, _ = family_store
    addr = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(addr)
        sock.settimeout(30)
        os.environ["NOTIFY_SOCKET"] = addr
        try:
            with mounted(store, tmp_path / "m") as proc:
                assert sock.recv(64) == b"READY=1"
                assert os.path.ismount(tmp_path / "m")
                proc.send_signal(signal.SIGTERM)
                assert sock.recv(64) == b"STOPPING=1"
        finally:
            del os.environ["NOTIFY_SOCKET"]


def test_unlink_and_rmdir_through_the_mount_remove_names(tmp_path, models, zipfs, store_path):
    for role in ("minilm", "sre"):
        assert zipfs("ingest", str(models[role]), "--name", role).code == 0
    m = tmp_path / "m"
    with mounted(store_path, m):
        with pytest.raises(OSError) as e:
            os.rmdir(m / "sre")
        assert e.value.errno == errno.ENOTEMPTY
        os.unlink(m / "sre/model.safetensors")
        assert not (m / "sre/model.safetensors").exists()
        for f in sorted((m / "sre").rglob("*"), reverse=True):
            (f.rmdir if f.is_dir() else f.unlink)()
        os.rmdir(m / "sre")
        assert os.listdir(m) == ["minilm"]
    assert "sre" not in zipfs("ls").out
    assert "sre" not in json.loads(zipfs("stats", "--json").out)["models"]
    assert zipfs("gc").code == 0 and zipfs("fsck").code == 0 and zipfs("verify").code == 0
