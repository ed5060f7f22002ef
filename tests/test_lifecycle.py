"""rm, gc, fsck, compact and du on the real MiniLM family."""

from __future__ import annotations

import json

from conftest import sha256
from zipfs.fs.process import mounted
from zipfs.store.lmdb_store import Store
from zipfs.store.records import u64key


def stats(zipfs) -> dict:
    return json.loads(zipfs("stats", "--json").out)


def test_rm_gc_compact_cycle(zipfs, models, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    base_only = stats(zipfs)["stored_bytes"]
    assert zipfs("ingest", str(models["sre"]), "--name", "sre").code == 0
    du = json.loads(zipfs("du", "--json").out)
    by = {u["name"]: u for u in du}
    assert by["sre"]["freed_by_rm"] > 30 << 20  # its own deltas
    assert by["minilm"]["freed_by_rm"] < by["minilm"]["shared_stored"]  # sre's deltas need it
    assert abs(sum(u["shared_stored"] for u in du) - stats(zipfs)["stored_bytes"]) < 1024

    # rm the fine-tune + gc: back to the base's bytes
    r = zipfs("rm", "sre")
    assert r.code == 0 and "removed 11 files, 2 directories" in r.out
    assert "sre" not in zipfs("ls").out
    assert zipfs("gc").code == 0
    assert stats(zipfs)["stored_bytes"] == base_only
    assert zipfs("fsck").code == 0

    # rm the base while a dependent exists: the dependent still reads byte-exact
    assert zipfs("ingest", str(models["sre"]), "--name", "sre").code == 0
    r = zipfs("rm", "minilm")
    assert "minilm is the base of sre" in r.out
    assert zipfs("gc").code == 0
    out = tmp_path / "out"
    assert zipfs("export", "sre", str(out)).code == 0
    assert sha256(out / "model.safetensors") == sha256(models["sre"] / "model.safetensors")
    assert zipfs("fsck", "--scrub").code == 0

    # both gone: no chunk left; compact shrinks the file
    assert zipfs("rm", "sre").code == 0
    assert zipfs("gc").code == 0
    s = stats(zipfs)
    assert s["chunks"] == 0 and s["stored_bytes"] == 0 and s["garbage_bytes"] == 0
    before = (store_path / "lmdb" / "data.mdb").stat().st_size
    r = zipfs("compact")
    assert r.code == 0, r.err
    assert (store_path / "lmdb" / "data.mdb").stat().st_size < before / 100
    assert zipfs("fsck").code == 0
    ls = zipfs("ls")
    assert ls.code == 0 and ls.out == ""


def test_compact_is_refused_while_mounted(zipfs, models, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"] / "config.json"), "--name", "c.json").code == 0
    with mounted(store_path, tmp_path / "m"):
        r = zipfs("compact")
        assert r.code == 1 and "in use" in r.err
    assert zipfs("compact").code == 0


def test_fsck_finds_and_repairs(zipfs, models, store_path):
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    with Store(store_path) as store, store.env.begin(write=True, buffers=True) as txn:
        rec = store.file_at(txn, "minilm/model.safetensors")
        cid = int(rec.chunk_ids[3])
        cr = store.chunk(txn, cid)
        cr.refs += 5
        store.put(txn, "chunks", u64key(cid), cr.pack())
        payload = bytearray(txn.get(u64key(cid), db=store.db["payloads"]))
        payload[-10] ^= 0xFF
        txn.put(u64key(cid), bytes(payload), db=store.db["payloads"])
    r = zipfs("fsck")
    assert r.code == 1 and f"chunk {cid}: reference count" in r.out
    r = zipfs("fsck", "--scrub")
    assert "checksum mismatch" in r.out or "does not decode" in r.out
    r = zipfs("fsck", "--repair")
    assert "reference counts set" in r.out
    r = zipfs("fsck")
    assert r.code == 0, r.out  # refcounts fixed; the corrupt payload is only seen by --scrub
    assert zipfs("fsck", "--scrub").code == 1


def test_rm_refuses_bad_names(zipfs, models):
    assert zipfs("ingest", str(models["minilm"] / "config.json"), "--name", "a/c.json").code == 0
    for bad in ("", "/", "a/../a", "nope"):
        r = zipfs("rm", bad)
        assert r.code == 1 and r.err.startswith("zipfs: error:"), bad
    assert "a/c.json" in zipfs("ls").out
