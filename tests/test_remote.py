"""The S3 remote against a real server (SeaweedFS): two machines (two processes with their own
stores and caches) sharing one bucket, concurrent writers, a server that goes away, a killed
push, gc racing a push, and damaged objects in the bucket."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import sha256
from test_mount import embed
from zipfs.cli import main as cli_main
from zipfs.fs.process import ROOT, mounted, zipfs_cmd
from zipfs.remote import config, layout
from zipfs.remote.client import Bucket
from zipfs.store.lmdb_store import Store


def z(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, as a second machine would run it."""
    r = subprocess.run(zipfs_cmd(store, *args), capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"zipfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def machine(tmp_path: Path, name: str, url: str, s3, cache: str = "1G") -> Path:
    store = tmp_path / name
    z(store, "remote", "set", url, "--endpoint", s3.endpoint, "--cache-size", cache)
    return store


def bucket(store: Path) -> Bucket:
    return Bucket(config.load(store))


def files_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def cache_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "remote-cache").iterdir())


def test_two_machines_share_one_bucket(tmp_path, models, s3, remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    out = z(a, "ingest", str(models["minilm"]), str(models["sre"])).stdout
    assert "sre: pushed version" in out and "base: minilm" in out, out
    b = machine(tmp_path, "b", remote_url, s3, cache="24M")
    mnt = tmp_path / "mnt"
    with mounted(b, mnt, "--cache-size", "64M"):
        assert sorted(os.listdir(mnt)) == ["minilm", "sre"]
        for role in ("minilm", "sre"):
            assert files_of(mnt / role) == files_of(models[role]), role
        assert np.array_equal(embed(mnt / "sre"), embed(models["sre"]))
        assert cache_bytes(b) <= 24 << 20
    with Store(b) as sb, sb.read() as txn:  # B keeps metadata only: no payload of its own
        assert sum(1 for _ in txn.cursor(db=sb.db["payloads"])) == 0
    with Store(a) as sa, sa.read() as txn:
        local = sum(rec.stored_len for _, rec in sa.iter_chunks(txn))
    in_bucket = sum(o.size for o in bucket(a).list(""))
    assert in_bucket <= 1.05 * local, (in_bucket, local)
    assert "0 problems" in z(b, "fsck", "--remote", "--scrub").stdout


def test_a_model_pushed_by_one_machine_is_the_base_of_anothers(tmp_path, models, s3, remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    z(a, "ingest", str(models["minilm"]))
    b = machine(tmp_path, "b", remote_url, s3)
    out = z(b, "ingest", str(models["sre"])).stdout
    assert "base: minilm" in out, out
    c = machine(tmp_path, "c", remote_url, s3)
    z(c, "pull", "sre")
    assert "11 ok" in z(c, "verify", "sre").stdout
    with Store(c) as sc, sc.read() as txn:  # the fine-tune's deltas read chunks that A uploaded
        from zipfs.remote import tables

        deltas = [rec for _, rec in sc.iter_chunks(txn) if rec.base]
        assert deltas
        a_packs = {o.key[len(layout.INDEX):] for o in bucket(a).list(layout.INDEX)}
        base_entries = [tables.entry(sc, txn, sc.chunk(txn, d.base).hash) for d in deltas[:20]]
        assert all(e is not None and e.pack in a_packs for e in base_entries)


def test_concurrent_writers_and_one_name_written_by_both(tmp_path, models, s3, remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    b = machine(tmp_path, "b", remote_url, s3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(store: Path, *cmds: list[str]) -> list[subprocess.Popen]:
        return [subprocess.Popen(zipfs_cmd(store, *c), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for c in cmds]

    procs = run(a, ["ingest", str(models["minilm"]), "--name", "shared"]) + \
        run(b, ["ingest", str(models["sre"]), "--name", "shared"])
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    procs = run(a, ["ingest", str(models["sre"]), "--name", "a/sre"]) + \
        run(b, ["ingest", str(models["gt-minilm"]), "--name", "b/minilm"])
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    c = machine(tmp_path, "c", remote_url, s3)
    mnt = tmp_path / "mnt"
    with mounted(c, mnt):
        assert files_of(mnt / "a/sre") == files_of(models["sre"])
        assert files_of(mnt / "b/minilm") == files_of(models["gt-minilm"])
        shared = files_of(mnt / "shared")
        assert shared in (files_of(models["minilm"]), files_of(models["sre"])), "a mixture of two versions"
    versions = sorted(o.key for o in bucket(c).list(layout.model_prefix("shared")))
    assert len(versions) == 2
    newest = layout.ModelManifest.parse(bucket(c).get(versions[-1]), versions[-1])
    assert (shared == files_of(models["sre"])) == (newest.writer == config.load(b).writer)
    assert "0 problems" in z(c, "fsck", "--remote").stdout


def _indexed(bk: Bucket) -> list[str]:
    """The hash of every chunk entry of every pack index in the bucket."""
    keys = [o.key for o in bk.list(layout.INDEX)]
    return [e.hash for k in keys for e in layout.parse_index(bk.get(k), k)]


def test_a_killed_push_uploads_only_what_is_missing_when_run_again(tmp_path, models, s3, remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZIPFS_FAULT": "push-pack:1"}
    r = subprocess.run(zipfs_cmd(a, "ingest", str(models["minilm"]), str(models["sre"])), env=env,
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr  # killed right after the first pack's index landed
    bk = bucket(a)
    landed = set(_indexed(bk))
    assert landed
    assert not list(bk.list(layout.MODELS)), "a model appeared before all it needs was uploaded"
    out = z(a, "ingest", str(models["minilm"]), str(models["sre"])).stdout
    lines = [x for x in out.splitlines() if "pushed version" in x]
    assert len(lines) == 2, out
    uploaded = sum(int(x.split(" chunks uploaded")[0].rsplit(" ", 1)[1].split("/")[0]) for x in lines)
    hashes = _indexed(bk)
    assert len(hashes) == len(set(hashes)), "a chunk was uploaded twice"
    assert uploaded == len(hashes) - len(landed) > 0, (uploaded, len(hashes), len(landed))
    b = machine(tmp_path, "b", remote_url, s3)
    z(b, "pull", "minilm", "sre")
    assert "20 ok" in z(b, "verify").stdout


def test_reads_fail_cleanly_while_the_server_is_away_and_work_again_after(tmp_path, models, s3, remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    z(a, "ingest", str(models["sre"]))
    b = machine(tmp_path, "b", remote_url, s3, cache="0")
    mnt = tmp_path / "mnt"
    orig = (models["sre"] / "model.safetensors").read_bytes()
    with mounted(b, mnt, "--cache-size", "8M") as proc:
        path = mnt / "sre/model.safetensors"
        with open(path, "rb", buffering=0) as f:
            assert f.read(4 << 20) == orig[:4 << 20]
        s3.stop()
        try:
            outcomes = []
            for off in (40 << 20, 60 << 20, 80 << 20):
                try:
                    with open(path, "rb", buffering=0) as f:
                        f.seek(off)
                        data = f.read(1 << 20)
                    assert data == orig[off:off + len(data)], "wrong bytes while the server is away"
                    outcomes.append("ok")
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    outcomes.append("EIO")
            assert "EIO" in outcomes
        finally:
            s3.start()
        assert proc.poll() is None, "the mount died"
        for off in (40 << 20, 60 << 20, 80 << 20):
            with open(path, "rb", buffering=0) as f:
                f.seek(off)
                assert f.read(1 << 20) == orig[off:off + (1 << 20)]
        assert sha256(path) == sha256(models["sre"] / "model.safetensors")


def test_gc_racing_a_push_deletes_nothing_the_push_needs(tmp_path, models, s3, remote_url, monkeypatch):
    from zipfs.remote import push as push_mod
    from zipfs.remote.attach import open_remote
    from zipfs.remote.gc import gc_remote

    a = machine(tmp_path, "a", remote_url, s3)
    b = machine(tmp_path, "b", remote_url, s3)
    z(a, "ingest", str(models["minilm"]))
    z(a, "rm", "minilm")  # its chunks are garbage now, old enough with a grace of 0 ...
    real_publish = push_mod.publish
    raced = []

    def publish(store, remote, manifest):  # ... and B's gc runs between A's upload and its publish
        raced.append(gc_remote(bucket(b), grace=600))
        raced.append(gc_remote(bucket(b), grace=600))
        return real_publish(store, remote, manifest)

    monkeypatch.setattr(push_mod, "publish", publish)
    with Store(a) as store:
        open_remote(store)
        from zipfs.ingest.ingester import Ingester
        from zipfs.ingest.model import ingest_model

        with Ingester(store) as ing:
            ingest_model(ing, models["sre"], "sre")
        push_mod.push(store, store.remote, "sre")
    assert raced and all(r.packs == 0 and r.condemned == 0 for r in raced), raced
    c = machine(tmp_path, "c", remote_url, s3)
    z(c, "pull", "sre")
    assert "11 ok" in z(c, "verify", "sre").stdout
    # with no grace, what the removed model alone held goes, in two steps; sre still reads
    before = sum(o.size for o in bucket(c).list(layout.PACKS))
    first, second = gc_remote(bucket(c), grace=0), gc_remote(bucket(c), grace=0)
    after = sum(o.size for o in bucket(c).list(layout.PACKS))
    assert first.condemned + first.repacked >= 1 and second.packs >= 1 and after < before, (first, second)
    d = machine(tmp_path, "d", remote_url, s3)
    z(d, "pull", "sre")
    assert "11 ok" in z(d, "verify", "sre").stdout
    assert "11 ok" in z(c, "verify", "sre").stdout  # C's locations named a repacked pack: found again
    assert "0 problems" in z(d, "fsck", "--remote", "--scrub").stdout


def test_a_condemned_pack_that_a_push_reused_is_indexed_again(tmp_path, models, s3, remote_url,
                                                               monkeypatch):
    from zipfs.ingest.ingester import Ingester
    from zipfs.ingest.model import ingest_model
    from zipfs.remote import push as push_mod
    from zipfs.remote.attach import open_remote
    from zipfs.remote.gc import gc_remote

    a = machine(tmp_path, "a", remote_url, s3)
    z(a, "ingest", str(models["minilm"]))
    z(a, "rm", "minilm")  # garbage in the bucket, which B's push of the same bytes reuses
    b = machine(tmp_path, "b", remote_url, s3)
    real_publish = push_mod.publish
    condemned = []

    def publish(store, remote, manifest):  # gc condemns them after B checked, before B publishes
        condemned.append(gc_remote(bucket(a), grace=0).condemned)
        return real_publish(store, remote, manifest)

    monkeypatch.setattr(push_mod, "publish", publish)
    with Store(b) as store, Ingester(store) as ing:
        open_remote(store)
        ingest_model(ing, models["gt-minilm"], "copy")
        r = push_mod.push(store, store.remote, "copy")
    assert condemned[0] >= 1 and r.uploaded_chunks < r.chunks // 4, (condemned, r)  # reused
    again = gc_remote(bucket(a), grace=0)
    assert again.restored >= 1 and again.packs == 0, again
    c = machine(tmp_path, "c", remote_url, s3)
    z(c, "pull", "copy")
    assert "13 ok, 0 failed" in z(c, "verify", "copy").stdout
    assert "0 problems" in z(c, "fsck", "--remote", "--scrub").stdout


def test_damaged_objects_in_the_bucket_are_one_line_errors_never_wrong_bytes(tmp_path, models, s3,
                                                                              remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    z(a, "ingest", str(models["sre"]))
    bk = bucket(a)
    key = next(o.key for o in bk.list(layout.MODELS))
    b = machine(tmp_path, "b", remote_url, s3, cache="0")
    z(b, "pull", "--metadata-only")
    pack = next(o.key for o in bk.list(layout.PACKS))
    data = bytearray(bk.get(pack))
    data[len(data) // 2] ^= 0x40
    bk.put(pack, bytes(data))  # a pack rewritten with one bit flipped
    r = z(b, "verify", "sre", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "does not match its checksum" in r.stdout + r.stderr, r.stdout + r.stderr
    bad = z(b, "fsck", "--remote", "--scrub", check=False)
    assert bad.returncode == 1 and "does not match its checksum" in bad.stdout
    for damage in (b"", b"\x28\xb5\x2f\xfd garbage", layout.encode({"name": "sre"}),
                   layout.encode({"name": "../../etc", "writer": "x", "created_ns": 1, "base": "",
                                  "reason": "", "entries": [], "deleted": False})):
        bk.put(key, damage)
        c = machine(tmp_path, f"c{len(damage)}", remote_url, s3)
        r = z(c, "pull", "--metadata-only", check=False)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
        r = z(c, "fsck", "--remote", check=False)
        assert r.returncode == 1 and "PROBLEM" in r.stdout and "Traceback" not in r.stderr
    evil = layout.ModelManifest("sre", "0" * 16, 1, "", "", [
        {"path": "../escape", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0}])
    bk.put(key, evil.encode())
    with pytest.raises(config.RemoteError, match="clean relative path"):
        layout.ModelManifest.parse(bk.get(key), key)


def test_remote_config_is_checked(tmp_path):
    for url in ("http://bucket", "s3://", "s3://Bad_Bucket", "s3://b"):
        with pytest.raises(config.RemoteError):
            config.parse_url(url)
    store = tmp_path / "s"
    code = cli_main(["--store", str(store), "remote", "set", "s3://ok-bucket", "--endpoint", "ftp://x"])
    assert code == 1
    store.mkdir(exist_ok=True)
    (store / config.FILE).write_text(json.dumps({"bucket": 5}))
    with pytest.raises(config.RemoteError, match="malformed|damaged"):
        config.load(store)


def test_fetched_payloads_stay_within_the_cache_limit_and_a_damaged_one_is_fetched_again(tmp_path, models, s3,
                                                                                      remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    z(a, "ingest", str(models["sre"]))
    b = machine(tmp_path, "b", remote_url, s3, cache="8M")
    z(b, "pull", "--metadata-only")
    assert "11 ok" in z(b, "verify", "sre").stdout
    assert 0 < cache_bytes(b) <= 8 << 20
    for p in (b / "remote-cache").iterdir():
        raw = bytearray(p.read_bytes())
        raw[0] ^= 1
        p.write_bytes(bytes(raw))
    assert "11 ok" in z(b, "verify", "sre").stdout
    assert "0 problems" in z(b, "fsck", "--scrub").stdout  # payloads in the bucket only are no problem
    z(b, "rm", "sre")
    z(b, "gc")
    with Store(b) as sb, sb.read() as txn:  # local gc forgot the chunks' bucket locations too
        assert sum(1 for _ in txn.cursor(db=sb.db["rlocs"])) == 0
    assert "0 problems" in z(b, "fsck").stdout


def test_a_mount_shows_other_machines_pushes_and_pushes_what_is_written_into_it(tmp_path, models, s3,
                                                                                 remote_url):
    import shutil
    import time

    a = machine(tmp_path, "a", remote_url, s3)
    b = machine(tmp_path, "b", remote_url, s3)
    mnt = tmp_path / "mnt"
    with mounted(b, mnt, log=tmp_path / "b.log"):
        assert os.listdir(mnt) == []
        z(a, "ingest", str(models["minilm"]))
        t0 = time.monotonic()
        while "minilm" not in os.listdir(mnt):
            assert time.monotonic() - t0 < 30, "another machine's push did not show up"
            time.sleep(0.2)
        seen_after = time.monotonic() - t0
        assert files_of(mnt / "minilm") == files_of(models["minilm"])
        shutil.copytree(models["sre"], mnt / "me/sre")  # written through B's mount
        z(b, "sync", str(mnt), "--wait", "--timeout", "300")
        t0 = time.monotonic()
        while not any(layout.model_of(o.key) == ("me/sre", layout.model_of(o.key)[1])
                      for o in bucket(a).list(layout.MODELS) if layout.model_of(o.key)):
            assert time.monotonic() - t0 < 60, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(0.3)
        shutil.rmtree(mnt / "minilm")  # removed and renamed through the mount: the bucket follows
        os.rename(mnt / "me/sre", mnt / "me/sre2")
        t0 = time.monotonic()
        while set(newest_models(bucket(a))) != {"me/sre2"}:
            log = (tmp_path / "b.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 60, (newest_models(bucket(a)), log)
            time.sleep(0.3)
    assert seen_after < 10
    c = machine(tmp_path, "c", remote_url, s3)
    z(c, "pull", "--metadata-only")
    assert "11 ok" in z(c, "verify", "me/sre2").stdout
    listed = z(c, "ls").stdout
    assert "me/sre2/" in listed and "minilm" not in listed and "me/sre/" not in listed, listed


def newest_models(bk: Bucket) -> list[str]:
    """The models whose newest version is not a removal."""
    newest: dict[str, str] = {}
    for o in bk.list(layout.MODELS):
        found = layout.model_of(o.key)
        if found and o.key > newest.get(found[0], ""):
            newest[found[0]] = o.key
    return sorted(n for n, k in newest.items() if not layout.ModelManifest.parse(bk.get(k), k).deleted)


def test_credentials_from_the_aws_shared_files(tmp_path, models, s3, remote_url, monkeypatch):
    a = machine(tmp_path, "a", remote_url, s3)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    aws = tmp_path / "aws"
    aws.mkdir()
    (aws / "credentials").write_text(f"[team]\naws_access_key_id = {s3.env['AWS_ACCESS_KEY_ID']}\n"
                                     f"aws_secret_access_key = {s3.env['AWS_SECRET_ACCESS_KEY']}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "team")
    assert "pushed version" in z(a, "ingest", str(models["minilm"])).stdout
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    r = z(a, "push", "minilm", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_model_changed_here_is_not_replaced_by_the_bucket_until_pushed(tmp_path, models, s3, remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    b = machine(tmp_path, "b", remote_url, s3)
    z(a, "ingest", str(models["minilm"]), "--name", "m")
    z(b, "pull", "--metadata-only")
    s3.stop()
    try:
        r = z(b, "ingest", str(models["sre"]), "--name", "m", check=False)
    finally:
        s3.start()
    assert r.returncode == 1 and "is stored here, but its push failed" in r.stderr, r.stderr
    z(a, "ingest", str(models["gt-minilm"]), "--name", "m")  # a newer version in the bucket
    assert "kept the store's own copy" in z(b, "pull", "--metadata-only").stdout
    assert files_of_store(b, "m") == files_of(models["sre"])
    z(b, "push", "m")
    c = machine(tmp_path, "c", remote_url, s3)
    z(c, "pull", "m")
    assert files_of_store(c, "m") == files_of(models["sre"])


def files_of_store(store: Path, name: str) -> dict[str, str]:
    out = tmp = store.parent / f"export-{store.name}-{name.replace('/', '_')}"
    z(store, "export", name, str(tmp))
    return files_of(out)


def test_a_pack_pushed_again_after_gc_condemned_it_is_kept(tmp_path, models, s3, remote_url):
    from zipfs.remote.gc import TRASH, gc_remote

    a = machine(tmp_path, "a", remote_url, s3)
    z(a, "ingest", str(models["minilm"]))
    z(a, "rm", "minilm")
    assert gc_remote(bucket(a), grace=0).condemned >= 1
    z(a, "ingest", str(models["minilm"]))  # the same bytes: the same packs, indexed again
    bk = bucket(a)
    trash = {o.key[len(TRASH):] for o in bk.list(TRASH)}
    both = trash & {o.key[len(layout.INDEX):] for o in bk.list(layout.INDEX)}
    assert both, "the test needs a pack both condemned and indexed"
    r = gc_remote(bk, grace=0)
    assert r.packs == 0, r
    assert not list(bk.list(TRASH))
    c = machine(tmp_path, "c", remote_url, s3)
    z(c, "pull", "minilm")
    assert "9 ok" in z(c, "verify").stdout
    r = z(a, "gc", "--remote", "--grace", "0", check=False)
    assert r.returncode == 1 and "--force" in r.stderr
    assert "bucket: deleted" in z(a, "gc", "--remote", "--grace", "0", "--force").stdout


def test_equal_files_of_an_imported_model_are_versions_of_their_own(tmp_path, models, s3, remote_url):
    import shutil

    src = tmp_path / "twins"
    shutil.copytree(models["minilm"], src)
    shutil.copy(src / "config.json", src / "config-copy.json")
    a = machine(tmp_path, "a", remote_url, s3)
    z(a, "ingest", str(src))
    b = machine(tmp_path, "b", remote_url, s3)
    z(b, "pull", "--metadata-only")
    with Store(b) as sb, sb.read() as txn:
        from zipfs.store import inodes

        ids = {inodes.resolve(sb, txn, f"twins/{n}").content_id for n in ("config.json", "config-copy.json")}
    assert len(ids) == 2
    z(b, "rm", "twins/config-copy.json")
    z(b, "gc")
    assert "9 ok, 0 failed" in z(b, "verify", "twins").stdout  # config.json still reads


def test_a_bucket_model_inside_a_model_of_this_stores_own_is_not_imported(tmp_path, models, s3, remote_url):
    a = machine(tmp_path, "a", remote_url, s3)
    z(a, "ingest", str(models["minilm"]), "--name", "x/y")
    b = tmp_path / "b"
    z(b, "ingest", str(models["sre"]), "--name", "x")  # before the store had a remote: its own
    z(b, "remote", "set", remote_url, "--endpoint", s3.endpoint)
    r = z(b, "pull", "--metadata-only")
    assert "x/y: kept" in r.stdout, r.stdout + r.stderr
    assert files_of_store(b, "x") == files_of(models["sre"])
