"""A schema-2 store (paths as keys, no record checksums) is upgraded in place when opened.

The schema-2 store is written here in its own format from a real ingest: every record the old
code wrote (path-keyed namespace with directories, stored and staged files and links; unsealed
file, chunk, hash-index, model, journal and counter records), so the upgrade sees what a user's
old store holds.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import lmdb

from conftest import sha256
from zipfs.store import inodes, journal
from zipfs.store import models as model_records
from zipfs.store.lmdb_store import Store
from zipfs.store.records import u64key, unseal


def _old_file_record(raw: bytes, mtime_ns: int, model: str) -> bytes:
    n = struct.unpack_from("<I", raw)[0]
    head = json.loads(raw[4:4 + n])
    head.update(mtime_ns=mtime_ns, model=model)
    js = json.dumps(head, separators=(",", ":")).encode()
    return struct.pack("<I", len(js)) + js + raw[4 + n:]


def write_schema2(src: Path, dest: Path, staged_path: str) -> int:
    """A schema-2 copy of store src at dest, with one extra staged file at staged_path; its sid."""
    (dest / "lmdb").mkdir(parents=True)
    env = lmdb.open(str(dest / "lmdb"), map_size=1 << 32, max_dbs=16)
    dbs = {n: env.open_db(n.encode()) for n in ("meta", "ns", "files", "chunks", "payloads", "chunkhash",
                                                  "models", "staged")}
    with Store(src) as store, store.read() as txn, env.begin(write=True) as out:
        for path, node in inodes.walk(store, txn):
            key = path.encode()
            if node.is_dir:
                out.put(key, b"D", db=dbs["ns"])
            elif node.is_link:
                out.put(key, b"L" + node.target, db=dbs["ns"])
            else:
                out.put(key, b"F" + u64key(node.content_id), db=dbs["ns"])
                raw = store.get(txn, "files", u64key(node.content_id))
                out.put(u64key(node.content_id), _old_file_record(raw, node.mtime_ns, path.split("/")[0]),
                        db=dbs["files"])
        for table in ("chunks", "chunkhash"):
            for k, v in store.scan(txn, table):
                out.put(k, v, db=dbs[table])
        for k, v in txn.cursor(db=store.db["payloads"]):
            out.put(bytes(k), bytes(v), db=dbs["payloads"])
        for name, m in model_records.named(store, txn).items():
            base = inodes.describe(store, txn, m.base) if m.base else None
            out.put(name.encode(), json.dumps({"base": base, "reason": m.reason, "ratio": m.ratio,
                                               "ingested": m.ingested, "size": m.size,
                                               "new_bytes": m.new_bytes, "delta_chunks": 0}).encode(),
                    db=dbs["models"])
        for counter in (b"next_chunk", b"next_file"):
            out.put(counter, unseal("meta", counter, txn.get(counter, db=store.db["meta"])), db=dbs["meta"])
        sid = 7
        out.put(staged_path.encode(), b"S" + u64key(sid), db=dbs["ns"])
        out.put(u64key(sid), json.dumps({"path": staged_path, "size": 5, "acked": True, "mtime_ns": 123,
                                         "state": "live"}).encode(), db=dbs["staged"])
        out.put(b"next_staged", b"8", db=dbs["meta"])
        out.put(b"schema", b"2", db=dbs["meta"])
    env.close()
    (dest / journal.STAGING_DIR).mkdir()
    (dest / journal.STAGING_DIR / str(sid)).write_bytes(b"hello")
    return sid


def test_schema2_store_is_upgraded_in_place(models, zipfs, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    assert zipfs("ingest", str(models["sre"]), "--name", "org/sre").code == 0
    old = tmp_path / "old"
    sid = write_schema2(store_path, old, "org/sre/notes.txt")
    zf = lambda *a: zipfs("--store", str(old), *a)  # noqa: E731 - later --store wins
    r = zf("verify")  # opening upgrades
    assert r.code == 0 and "20 ok, 0 failed" in r.out, r.out
    assert zf("fsck").code == 0
    with Store(old) as store, store.read() as txn:
        assert unseal("meta", b"schema", txn.get(b"schema", db=store.db["meta"])) == b"4"
        node = inodes.resolve(store, txn, "org/sre/model.safetensors")
        mtime = (models["sre"] / "model.safetensors").stat().st_mtime_ns
        assert node.mode == 0o100644 and node.mtime_ns == mtime
        staged = inodes.resolve(store, txn, "org/sre/notes.txt")
        assert (staged.content, staged.content_id, staged.size) == (inodes.STAGED, sid, 5)
        assert journal.get(store, txn, sid).ino == staged.ino
        named = model_records.named(store, txn)
        assert set(named) == {"minilm", "org/sre"}
        assert inodes.describe(store, txn, named["org/sre"].base) == "minilm"
        assert "ns" not in [bytes(k).decode() for k, _ in txn.cursor()]
    out = tmp_path / "out"
    assert zf("export", "org/sre", str(out)).code != 0  # the staged file is only readable through a mount
    assert sha256(out / "model.safetensors") == sha256(models["sre"] / "model.safetensors")
    assert zf("rm", "minilm").code == 0 and zf("gc").code == 0 and zf("verify").code == 0


def test_schema3_store_opens_as_schema4_and_an_older_zipfs_is_told(models, zipfs, store_path):
    """Schema 4 adds chunk kinds (verbatim, zstd-frame) and block payloads: nothing to convert,
    but a zipfs that knows schema 3 only must refuse the store, not call new chunks damage."""
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    with Store(store_path) as store:
        store.writer.call(lambda txn: store.put(txn, "meta", b"schema", b"3"))
    assert zipfs("verify").code == 0
    with Store(store_path) as store, store.read() as txn:
        assert unseal("meta", b"schema", txn.get(b"schema", db=store.db["meta"])) == b"4"
        store.writer.call(lambda t: store.put(t, "meta", b"schema", b"5"))
    r = zipfs("verify")
    assert r.code != 0 and "newer than this zipfs supports (4)" in r.err
