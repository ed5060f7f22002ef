"""The writable mount: cp -r, save_pretrained, downloader-style renames, symlinks, copy-up,
background ingest with deltas, backpressure, a full disk, recovery of the staging area."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import fetch_models
from conftest import sha256
from zipfs.fs.process import mounted, zipfs_cmd
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.model import ingest_one
from zipfs.store import inodes, journal, staging
from zipfs.store.lmdb_store import Store


def sync(store: Path, mnt: Path) -> str:
    r = subprocess.run(zipfs_cmd(store, "sync", "--wait", "--timeout", "120", str(mnt)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def wait_until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def state(path: Path) -> str:
    return os.getxattr(path, "user.zipfs.state").decode()


def stored_bytes(store_path: Path, path: str) -> int:
    with Store(store_path) as store, store.read() as txn:
        return store.file_at(txn, path).new_bytes


def test_cp_r_of_a_fine_tune_is_ingested_with_deltas_like_zipfs_ingest(models, zipfs, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    m = tmp_path / "m"
    with mounted(store_path, m, "--log-file", str(tmp_path / "log")):
        subprocess.run(["cp", "-r", str(models["sre"]), str(m / "sre")], check=True)
        assert state(m / "sre/model.safetensors") in ("staged", "ingesting")
        assert "0 files to ingest" in sync(store_path, m)
        for f in sorted(models["sre"].rglob("*")):
            if f.is_file():
                rel = f.relative_to(models["sre"])
                assert sha256(m / "sre" / rel) == sha256(f), rel
                assert state(m / "sre" / rel) == "stored"
        assert not os.listdir(store_path / "staging")
    mounted_cost = stored_bytes(store_path, "sre/model.safetensors")
    # the same file through `zipfs ingest` into a store holding the same base
    other = tmp_path / "other"
    for role in ("minilm", "sre"):
        assert zipfs("--store", str(other), "ingest", str(models[role]), "--name", role).code == 0
    cli_cost = stored_bytes(other, "sre/model.safetensors")
    assert mounted_cost <= 1.01 * cli_cost  # the same pipeline (the order of chunk dedup may differ)
    assert mounted_cost < 0.45 * (models["sre"] / "model.safetensors").stat().st_size
    stats = json.loads(zipfs("stats", "--json").out)
    assert stats["models"]["sre"]["base"] == "minilm" and stats["staged_files"] == 0
    assert zipfs("verify").code == 0 and zipfs("fsck").code == 0


def test_models_copied_into_the_mount_are_listed_by_stats_and_du(models, zipfs, store_path, tmp_path):
    """A directory copied in is a model, as `zipfs ingest DIR --name me/ft` makes one: its first
    weights file (safetensors, GGUF, or a format stored as opaque bytes such as .npz) registers
    it, what is later written under it stays part of it, the folder above it is not a model."""
    gguf = fetch_models.fetch(["smollm2-gguf"])["smollm2-gguf"]
    npz = tmp_path / "npz"  # real weights in a format zipfs does not parse
    npz.mkdir()
    np.savez(npz / "weights.npz", **load_file(models["minilm"] / "model.safetensors"))
    onnx = (models["minilm"] / "tokenizer.json").read_bytes()  # stands in for an onnx/ export
    m = tmp_path / "m"
    with mounted(store_path, m):
        (m / "me").mkdir()
        for src, dest in ((models["minilm"], "me/ft"), (gguf, "me/q4"), (npz, "me/np")):
            subprocess.run(["cp", "-r", str(src), str(m / dest)], check=True)
        sync(store_path, m)
        (m / "me/ft/onnx").mkdir()
        (m / "me/ft/onnx/model.onnx").write_bytes(onnx)
        sync(store_path, m)
    stats = json.loads(zipfs("stats", "--json").out)["models"]
    du = {u["name"]: u for u in json.loads(zipfs("du", "--json").out)}
    assert set(stats) == set(du) == {"me/ft", "me/q4", "me/np"}
    for name, src, extra in (("me/ft", models["minilm"], [len(onnx)]), ("me/q4", gguf, []),
                             ("me/np", npz, [])):
        sizes = [f.stat().st_size for f in src.rglob("*") if f.is_file()] + extra
        assert stats[name]["size"] == du[name]["logical"] == sum(sizes), name
        assert du[name]["files"] == len(sizes)
        assert 0 < stats[name]["new_bytes"] < sum(sizes) and 0 < du[name]["shared_stored"] < sum(sizes)
    assert "me/q4" in zipfs("stats").out and "me/q4" in zipfs("du").out


def test_save_pretrained_downloads_and_symlinks(models, zipfs, store_path, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    model = transformers.AutoModel.from_pretrained(models["sre"])
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    m = tmp_path / "m"
    with mounted(store_path, m):
        model.save_pretrained(m / "org/saved")
        # a downloader: write x.incomplete, fsync, rename into place; an HF-cache-style symlink
        blob = m / "hub/blobs/abc123"
        blob.parent.mkdir(parents=True)
        data = (models["sre"] / "tokenizer.json").read_bytes()
        with open(f"{blob}.incomplete", "wb") as f:
            for i in range(0, len(data), 100_000):
                f.write(data[i:i + 100_000])
            f.flush()
            os.fsync(f.fileno())
        os.rename(f"{blob}.incomplete", blob)
        (m / "hub/snapshots/rev").mkdir(parents=True)
        os.symlink("../../blobs/abc123", m / "hub/snapshots/rev/tokenizer.json")
        sync(store_path, m)
        assert sha256(m / "org/saved/model.safetensors") == sha256(plain / "model.safetensors")
        assert os.readlink(m / "hub/snapshots/rev/tokenizer.json") == "../../blobs/abc123"
        assert (m / "hub/snapshots/rev/tokenizer.json").read_bytes() == data
        assert sorted(os.listdir(m / "hub/blobs")) == ["abc123"]
        loaded = transformers.AutoModel.from_pretrained(m / "org/saved")
        ids = torch.tensor([[101, 7592, 2088, 102]])
        with torch.no_grad():
            assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)
    ls = zipfs("ls", "hub").out
    assert "hub/snapshots/rev/tokenizer.json -> ../../blobs/abc123" in ls
    assert zipfs("verify").code == 0


def test_copy_up_truncate_rename_and_namespace_rules(models, zipfs, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    orig = (models["minilm"] / "tokenizer.json").read_bytes()
    m = tmp_path / "m"
    with mounted(store_path, m):
        vocab = m / "minilm/tokenizer.json"
        with open(vocab, "r+b") as f:  # copy-up: a stored file opened for writing
            f.seek(10)
            f.write(b"XYZ")
        expect = orig[:10] + b"XYZ" + orig[13:]
        assert vocab.read_bytes() == expect
        with open(vocab, "ab") as f:
            f.write(b"tail")
        expect += b"tail"
        os.truncate(m / "minilm/config.json", 5)
        cfg = (models["minilm"] / "config.json").read_bytes()[:5]
        os.utime(vocab, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
        os.mkdir(m / "tmp")
        (m / "tmp/a.txt").write_bytes(b"first")
        (m / "tmp/b.txt").write_bytes(b"second")
        os.rename(m / "tmp/b.txt", m / "tmp/a.txt")  # replaces a staged file
        os.rename(m / "tmp", m / "moved")  # a directory with staged content
        with pytest.raises(FileExistsError):
            os.mkdir(m / "moved")
        with pytest.raises(OSError) as e:
            os.rmdir(m / "moved")
        assert e.value.errno == errno.ENOTEMPTY
        os.link(m / "moved/a.txt", m / "moved/hard")  # hard links: two entries, one inode
        assert os.stat(m / "moved/a.txt").st_nlink == 2 and (m / "moved/hard").read_bytes() == b"second"
        assert os.stat(m / "moved/hard").st_ino == os.stat(m / "moved/a.txt").st_ino
        os.unlink(m / "moved/hard")
        assert os.stat(m / "moved/a.txt").st_nlink == 1
        sync(store_path, m)
        assert vocab.read_bytes() == expect
        assert os.stat(vocab).st_mtime_ns == 1_600_000_000 * 10**9
        assert (m / "minilm/config.json").read_bytes() == cfg
        assert sorted(os.listdir(m / "moved")) == ["a.txt"]
        assert (m / "moved/a.txt").read_bytes() == b"second"
        assert not (m / "tmp").exists()
    assert "staged" not in zipfs("ls").out
    assert zipfs("verify").code == 0 and zipfs("fsck").code == 0


def test_cli_ingest_while_mounted_shows_in_the_mount(models, zipfs, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"] / "config.json"), "--name", "a.json").code == 0
    m = tmp_path / "m"
    with mounted(store_path, m):
        assert os.listdir(m) == ["a.json"]
        assert not (m / "b.json").exists()
        r = subprocess.run(zipfs_cmd(store_path, "ingest", str(models["sre"] / "config.json"),
                                     "--name", "b.json"), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: (m / "b.json").exists())
        assert (m / "b.json").read_bytes() == (models["sre"] / "config.json").read_bytes()


def test_read_only_mount_refuses_writes(models, zipfs, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"] / "config.json"), "--name", "a.json").code == 0
    with mounted(store_path, tmp_path / "m", "--read-only"):
        for attempt in (lambda: open(tmp_path / "m/new", "w"), lambda: open(tmp_path / "m/a.json", "r+b")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS


def test_backpressure_waits_for_ingest_instead_of_evicting(models, zipfs, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"] / "config.json"), "--name", "a.json").code == 0
    data = (models["sre"] / "tokenizer.json").read_bytes()
    m = tmp_path / "m"
    with mounted(store_path, m, "--staging-limit", "1M"):
        for i in range(6):
            (m / f"t{i}.json").write_bytes(data)
        sync(store_path, m)
        stats = json.loads(os.getxattr(m, "user.zipfs.stats"))
        assert stats["backpressure_waits"] > 0 and stats["ingested_files"] == 6
        for i in range(6):
            assert (m / f"t{i}.json").read_bytes() == data


def test_full_disk_fails_at_write_or_close_and_keeps_serving(models, small_fs, tmp_path):
    store_path = small_fs / "store"
    keep = models["minilm"] / "tokenizer.json"
    with Store(store_path) as store, Ingester(store) as ing:
        ingest_one(ing, keep, "keep.json")
    m = tmp_path / "m"
    with mounted(store_path, m, "--log-file", str(tmp_path / "log")):
        with pytest.raises(OSError) as e:
            with open(m / "big.bin", "wb") as f:
                block = np.random.default_rng(0).bytes(1 << 20)
                for _ in range(64):
                    f.write(block)
        assert e.value.errno == errno.ENOSPC
        # never acknowledged: removed at its last close (release is asynchronous to close)
        wait_until(lambda: not (m / "big.bin").exists())
        assert (m / "keep.json").read_bytes() == keep.read_bytes()
        (m / "small.txt").write_bytes(b"fits")
        sync(store_path, m)
        assert (m / "small.txt").read_bytes() == b"fits"
    r = subprocess.run(zipfs_cmd(store_path, "verify"), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_recovery_without_fuse(store_path):
    """After a crash every file is its last acknowledged version: tails past the acknowledged size
    are cut, a newer version never acknowledged goes to lost+found (the file keeps the old one), a
    new file never closed loses its name, tombstones are purged, staging files without a row are
    kept in lost+found."""
    with Store(store_path) as store:
        sids: dict[str, int] = {}
        rel = inodes.Released()

        def new_file(txn, name: str) -> int:
            d = inodes.make_dirs(store, txn, [b"d"], 0, 0, 1)
            node = inodes.create(store, txn, d.ino, name.encode(), 0o100644, 0, 0, 1)
            return node.ino

        def version(txn, ino: int, name: str, acked: bool, shown: bool, created: bool = False) -> None:
            sid = sids[name] = journal.new(store, txn, ino, created=created)
            if acked:
                journal.put(store, txn, sid, journal.StagedRecord(ino, 6, True))
            if shown:
                inodes.set_content(store, txn, inodes.get(store, txn, ino), inodes.STAGED, sid, 6, rel)

        def setup(txn) -> None:
            version(txn, new_file(txn, "acked"), "acked", True, True)
            version(txn, new_file(txn, "unacked"), "unacked", False, False, created=True)
            ino = new_file(txn, "rewritten")
            version(txn, ino, "old", True, True)
            version(txn, ino, "new", False, False)
            version(txn, new_file(txn, "removed"), "removed", True, True)
            inodes.unlink(store, txn, inodes.resolve(store, txn, "d").ino, b"removed", 2, rel)

        store.writer.call(setup)
        staging.staging_dir(store).mkdir()
        for sid in sids.values():
            journal.staging_path(store, sid).write_bytes(b"0123456789")
        (staging.staging_dir(store) / "999").write_bytes(b"orphan")
        rec = staging.recover(store)
        assert set(rec.live) == {sids["acked"], sids["old"]} and rec.purged == 1
        assert sorted(rec.truncated) == ["d/acked", "d/rewritten"] and rec.unnamed == ["d/unacked"]
        assert journal.staging_path(store, sids["acked"]).read_bytes() == b"012345"
        assert len(rec.lost) == 3
        lost = sorted(p.read_bytes() for p in (store_path / "lost+found").iterdir())
        assert lost == [b"0123456789", b"0123456789", b"orphan"]
        with store.read() as txn:
            assert [p for p, _ in inodes.walk(store, txn)] == ["d", "d/acked", "d/rewritten"]
            assert inodes.resolve(store, txn, "d/rewritten").content_id == sids["old"]
            assert set(journal.records(store, txn)) == {sids["acked"], sids["old"]}
