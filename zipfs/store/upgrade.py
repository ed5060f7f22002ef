"""The schema version of a store: a new store is initialised, an older one upgraded in place.

Schema 3 keys the namespace by (parent inode, name), keeps mode, owner and times per inode and
seals every record with a checksum. Schemas 1 and 2 keyed it by whole paths (LMDB keys are at
most 511 bytes, so long paths could not be stored) and had no checksums on metadata. The
upgrade runs in one write transaction, so a crash leaves the old store untouched: it reseals
chunk, hash-index and file records, builds inodes and directory entries from the path table
(files 0644, directories 0755, owned by the store's owner), rekeys models by inode and the
staging journal by inode, and drops the path table. Schema 4 adds chunk kinds (verbatim,
zstd-frame) and block payloads for GGUF; a schema-3 store needs no conversion.
"""

from __future__ import annotations

import json
import os
import stat
import time

import lmdb

from zipfs.errors import StoreError
from zipfs.store import inodes, journal, models, names
from zipfs.store.records import ChunkRecord, DamagedRecord, FileRecord, key_u64, unseal

#: the meta counters of every schema
COUNTERS = (b"next_chunk", b"next_file", journal.NEXT_SID)


def _version(store, txn: lmdb.Transaction) -> int:
    raw = txn.get(b"schema", db=store.db["meta"])
    if raw is None:
        return 0
    try:
        return int(unseal("meta", b"schema", raw))
    except DamagedRecord:
        pass
    try:
        return int(bytes(raw))  # schemas 1 and 2 did not seal
    except ValueError:
        raise DamagedRecord("the store's schema record is damaged") from None


def open_schema(store) -> None:
    """Initialise a new store, upgrade an older one, refuse a newer one."""
    from zipfs.store.lmdb_store import SCHEMA_VERSION

    with store.read() as txn:
        version = _version(store, txn)
    if version > SCHEMA_VERSION:
        raise StoreError(f"store {store.path} has schema {version}, newer than this zipfs supports "
                         f"({SCHEMA_VERSION}); upgrade zipfs")
    if version == SCHEMA_VERSION:
        return
    owner = os.stat(store.path)
    ns = None
    if 0 < version < 3:
        try:
            ns = store.env.open_db(b"ns", create=False)
        except lmdb.NotFoundError:
            raise StoreError(f"store {store.path} has schema {version} but no namespace table") from None

    def op(txn: lmdb.Transaction) -> None:
        if _version(store, txn) != version:
            return  # another process did it meanwhile
        if version == 0:
            inodes.make_root(store, txn, owner.st_uid, owner.st_gid, time.time_ns())
        elif version < 3:
            _upgrade(store, txn, ns, owner.st_uid, owner.st_gid)
        # 3 -> 4 converts nothing: the chunk kinds verbatim and zstd-frame and the block payloads
        # (GGUF) of schema 4 appear only in what is written from now on; the version says that a
        # zipfs that does not know them must not open the store (it would call them damage)
        store.put(txn, "meta", b"schema", str(SCHEMA_VERSION).encode())

    try:
        store.writer.call(op)
    except StoreError as e:
        raise StoreError(f"cannot upgrade store {store.path} to schema {SCHEMA_VERSION}: {e}") from None


def _old_entry(raw: bytes) -> tuple[bytes, int, bytes]:
    """(kind, id, link target) of a schema 1/2 namespace value."""
    kind = raw[:1]
    if kind in (b"F", b"S") and len(raw) == 9:
        return kind, key_u64(raw[1:]), b""
    if raw == b"D":
        return kind, 0, b""
    if kind == b"L" and len(raw) > 1:
        return kind, 0, raw[1:]
    raise DamagedRecord("a namespace entry of the old store is malformed")


def _upgrade(store, txn: lmdb.Transaction, ns: lmdb._Database, uid: int, gid: int) -> None:
    meta = store.db["meta"]
    for name in COUNTERS:
        raw = txn.get(name, db=meta)
        if raw is not None:
            store.put(txn, "meta", name, bytes(raw))
    for table, check in (("chunks", ChunkRecord.unpack), ("chunkhash", None)):
        for k, v in list(txn.cursor(db=store.db[table])):
            if check is not None:
                check(bytes(v))
            store.put(txn, table, bytes(k), bytes(v))
    mtimes = {}
    for k, v in list(txn.cursor(db=store.db["files"])):
        head_len = int.from_bytes(bytes(v[:4]), "little")
        mtimes[key_u64(bytes(k))] = json.loads(bytes(v[4:4 + head_len])).get("mtime_ns", 0)
        store.put(txn, "files", bytes(k), FileRecord.unpack(bytes(v)).pack())
    old_journal = {key_u64(bytes(k)): json.loads(bytes(v)) for k, v in txn.cursor(db=store.db["staged"])}
    txn.drop(store.db["staged"], delete=False)
    now = time.time_ns()
    inodes.make_root(store, txn, uid, gid, now)
    by_path: dict[str, int] = {"": inodes.ROOT}
    for k, v in list(txn.cursor(db=ns)):
        path = names.show(bytes(k))
        kind, ident, target = _old_entry(bytes(v))
        parts = path.split("/")
        for i in range(1, len(parts)):  # schema 1/2 stores kept their directories; be sure anyway
            d = "/".join(parts[:i])
            if d not in by_path:
                up = by_path["/".join(parts[:i - 1])]
                by_path[d] = inodes.create(store, txn, up, names.encode(parts[i - 1]), stat.S_IFDIR | 0o755,
                                           uid, gid, now).ino
        parent, name = by_path["/".join(parts[:-1])], names.encode(parts[-1])
        if kind == b"D":
            by_path[path] = inodes.create(store, txn, parent, name, stat.S_IFDIR | 0o755, uid, gid, now).ino
            continue
        mode = stat.S_IFLNK | 0o777 if kind == b"L" else stat.S_IFREG | 0o644
        node = inodes.create(store, txn, parent, name, mode, uid, gid, now, target=target)
        by_path[path] = node.ino
        if kind == b"F":
            rec = store.file(txn, ident)
            node.content, node.content_id, node.size = inodes.STORED, ident, rec.size
            node.mtime_ns = node.ctime_ns = mtimes.get(ident) or now
        elif kind == b"S":
            row = old_journal.pop(ident, {})
            acked = bool(row.get("acked"))
            journal.put(store, txn, ident, journal.StagedRecord(node.ino, row.get("size", 0), acked,
                                                                row.get("state", journal.LIVE)))
            if acked and row.get("state", journal.LIVE) == journal.LIVE:
                node.content, node.content_id, node.size = inodes.STAGED, ident, row.get("size", 0)
                node.mtime_ns = node.ctime_ns = row.get("mtime_ns") or now
        inodes.put(store, txn, node)
    for sid, row in old_journal.items():  # rows without a name: tombstones to purge
        journal.put(store, txn, sid, journal.StagedRecord(0, row.get("size", 0), False, journal.DEAD))
    old_models = [(names.show(bytes(k)), json.loads(bytes(v))) for k, v in txn.cursor(db=store.db["models"])]
    txn.drop(store.db["models"], delete=False)
    for path, rec in old_models:
        if path not in by_path:
            continue
        base = by_path.get(rec.get("base") or "", 0) if rec.get("base") else 0
        models.put(store, txn, models.Model(by_path[path], base, rec.get("reason", ""), rec.get("ratio"),
                                            rec.get("ingested", 0.0), rec.get("size") or 0,
                                            rec.get("new_bytes") or 0, rec.get("delta_chunks", 0)))
    txn.drop(ns, delete=True)
