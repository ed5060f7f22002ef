"""Show the bucket's models in the local store: import manifest versions as metadata (inodes,
file and chunk records, where each payload lies), payloads fetched when read or by `pull`.

A model's import is one transaction: it appears whole, or not at all. A chunk the store has
already (same content hash) is used as it is; a new one gets a local record from its entry and
its bucket location, and no payload until someone reads it.
"""

from __future__ import annotations

import logging
import stat
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import lmdb
import numpy as np

from zipfs.errors import NotFoundError, ZipfsError
from zipfs.remote import layout, tables
from zipfs.remote.attach import Remote
from zipfs.remote.layout import FILES, MODELS, Entry, FileManifest, ModelManifest
from zipfs.store import inodes, journal, models, names
from zipfs.store.lifecycle import add_refs
from zipfs.store.lmdb_store import Store
from zipfs.store.records import FileRecord, TensorEntry, key_u64, u64key

log = logging.getLogger("zipfs.remote")
READERS = 8


@dataclass
class SyncReport:
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def newest(remote: Remote) -> dict[str, str]:
    """The newest manifest version of every model in the bucket."""
    out: dict[str, str] = {}
    for o in remote.bucket.list(MODELS):
        found = layout.model_of(o.key)
        if found is not None and found[1] > out.get(found[0], ""):
            out[found[0]] = found[1]
    return out


def _chunk_id(store: Store, txn: lmdb.Transaction, e: Entry, by_hash: dict[str, Entry],
              made: dict[str, int]) -> int:
    """The local chunk with e's bytes: the store's own, or a new record pointing at the bucket."""
    if e.hash in made:
        return made[e.hash]
    hit = store.get(txn, "chunkhash", bytes.fromhex(e.hash))
    if hit is not None:
        made[e.hash] = key_u64(hit)
        return made[e.hash]
    base_id = _chunk_id(store, txn, by_hash[e.base], by_hash, made) if e.base else 0
    if base_id and store.chunk(txn, base_id).base:  # the local copy of the base is a delta itself
        raise ZipfsError(f"chunk {e.hash[:16]}: its base is stored here as a delta; run zipfs gc and retry")
    cid = store.next_id(txn, b"next_chunk")
    store.put(txn, "chunks", u64key(cid), e.record(base_id).pack(), overwrite=False)
    store.put(txn, "chunkhash", bytes.fromhex(e.hash), u64key(cid))
    tables.put_location(store, txn, cid, e)
    tables.put_entry(store, txn, e)
    if base_id:
        add_refs(store, txn, Counter({base_id: 1}))
    made[e.hash] = cid
    return cid


def _put_file(store: Store, txn: lmdb.Transaction, fm: FileManifest, made: dict[str, int]) -> tuple[int,
                                                                                                   FileRecord]:
    by_hash = {e.hash: e for e in fm.chunks}
    ids = [_chunk_id(store, txn, fm.chunks[i], by_hash, made) for i in fm.refs]
    try:
        frec = FileRecord(fm.size, fm.sha256, fm.kind, np.array(fm.offsets, dtype=np.uint64),
                          np.array(ids, dtype=np.uint64), [TensorEntry(*t) for t in fm.tensors], fm.note)
        frec.check()
        frec.pack()
    except (TypeError, ValueError, OverflowError, ZipfsError):
        raise ZipfsError("a file manifest's extents or tensors are malformed") from None
    fid = store.next_id(txn, b"next_file")
    add_refs(store, txn, Counter(ids))
    store.put(txn, "files", u64key(fid), frec.pack(), overwrite=False)
    return fid, frec


def import_model(store: Store, remote: Remote, name: str, version: str) -> None:
    """Make the store show version `version` of model `name` (replacing what it showed there)."""
    key = layout.model_prefix(name) + version
    m = ModelManifest.parse(remote.bucket.get(key), key)
    file_keys = sorted({e["file"] for e in m.entries if e["type"] == "file"})

    def read(fkey: str) -> FileManifest:
        return FileManifest.parse(remote.bucket.get(FILES + fkey), FILES + fkey)

    with ThreadPoolExecutor(READERS) as pool:
        manifests = dict(zip(file_keys, pool.map(read, file_keys), strict=True))
    rel = inodes.Released()

    def op(txn: lmdb.Transaction) -> None:
        rel.dead.clear()
        rel.removed.clear()
        if tables.model_version(store, txn, name) == version:
            return  # another process of this store imported it meanwhile
        try:
            here = list(inodes.walk(store, txn, name))
        except NotFoundError:
            here = []
        if any(node.is_reg and node.content == inodes.STAGED for _, node in here):
            raise ZipfsError(f"{name}: files of it are being written here; it is pushed once they are stored")
        now = time.time_ns()
        try:
            inodes.remove_tree(store, txn, name, now, rel)
        except NotFoundError:
            pass
        for inner, _ in list(store.scan(txn, "rmodels", prefix=names.encode(name) + b"/")):
            store.delete(txn, "rmodels", inner)  # models inside it went with it: import them again
        if m.deleted:
            tables.set_model_version(store, txn, name, version, removed=True)
            return
        made: dict[str, int] = {}
        top = None
        for e in sorted(m.entries, key=lambda e: e["path"].count("/") if e["path"] else -1):
            path = f"{name}/{e['path']}" if e["path"] else name
            mode = stat.S_IMODE(e["mode"])
            if e["type"] == "dir":
                node = inodes.make_dirs(store, txn, names.split(path), e["uid"], e["gid"], now, mode)
                node.mode, node.uid, node.gid = stat.S_IFDIR | mode, e["uid"], e["gid"]
            elif e["type"] == "link":
                node = inodes.replace(store, txn, path, stat.S_IFLNK | 0o777, e["uid"], e["gid"], now, rel,
                                      target=names.encode(e["target"]))
            else:
                # a version of its own per file, as an ingest makes: two files with equal bytes
                # share chunks, never a version (an inode's removal orphans its version)
                fid, frec = _put_file(store, txn, manifests[e["file"]], made)
                node = inodes.replace(store, txn, path, stat.S_IFREG | mode, e["uid"], e["gid"], now, rel)
                node.mtime_ns = e["mtime_ns"]
                inodes.set_content(store, txn, node, inodes.STORED, fid, frec.size, rel)
            node.mtime_ns = node.atime_ns = e["mtime_ns"]
            inodes.put(store, txn, node)
            if not e["path"]:
                top = node
        if top is not None and (top.is_dir or top.is_reg):
            base_ino = 0
            if m.base:
                try:
                    base_ino = inodes.resolve(store, txn, m.base).ino
                except ZipfsError:
                    pass
            size = sum(manifests[e["file"]].size for e in m.entries if e["type"] == "file")
            models.put(store, txn, models.Model(top.ino, base_ino, m.reason, None, time.time(), size, 0, 0))
        tables.set_model_version(store, txn, name, version)

    store.writer.call(op)
    journal.purge(store, rel.dead)


def sync(store: Store, remote: Remote, only: str | None = None,
         keep: frozenset[str] = frozenset()) -> SyncReport:
    """Import every model whose newest version in the bucket is not what the store shows. A
    model here that never came from the bucket nor went to it (a push that failed), one with
    files being written here, and those in keep (changed here, about to be pushed) are kept."""
    report = SyncReport()
    want = {n: v for n, v in newest(remote).items() if n not in keep}
    if only is not None:
        if only not in want:
            raise NotFoundError(f"{only}: no such model in {remote.cfg.url}")
        want = {only: want[only]}
    with store.read() as txn:
        own = {n for n in models.named(store, txn) if tables.model_version(store, txn, n) is None}
    for name, version in sorted(want.items()):
        with store.read() as txn:
            have = tables.model_version(store, txn, name)
            try:
                inodes.resolve(store, txn, name)
                exists = True
            except ZipfsError:
                exists = False
        if have == version:
            continue
        inside = next((o for o in own if name.startswith(o + "/")), None)
        if inside is not None:  # it would land inside a model of this store's own
            report.skipped.append(name)
            log.warning("%s: not imported: it lies inside %s, a model of this store's own", name, inside)
            continue
        if have is None and exists:
            report.skipped.append(name)
            log.warning("%s: the store has its own copy, not the bucket's; push it or remove it", name)
            continue
        try:
            import_model(store, remote, name, version)
        except ZipfsError as e:
            report.skipped.append(name)
            log.warning("%s: not imported: %s", name, e)
            continue
        report.imported.append(name)
    return report


def fetch_all(store: Store, remote: Remote, name: str) -> int:
    """Copy every payload of the model at name that this store lacks into it (zipfs pull):
    bytes fetched. Once local, they are the store's own, as if ingested here."""
    with store.read() as txn:
        cids: set[int] = set()
        for _, node in inodes.walk(store, txn, name):
            if node.is_reg and node.content == inodes.STORED:
                cids.update(store.file(txn, node.content_id).chunk_ids.tolist())
        cids |= {store.chunk(txn, c).base for c in cids} - {0}
        far = [c for c in sorted(cids) if store.local_payload(txn, c) is None]
        store.prefetch_payloads(txn, far)
    fetched = 0
    for i in range(0, len(far), 64):
        with store.read() as txn:
            got = [(c, bytes(store.payload(txn, c))) for c in far[i:i + 64]]

        def op(txn: lmdb.Transaction, got=got) -> None:
            for c, data in got:
                if store.get(txn, "chunks", u64key(c)) is not None:  # not freed by gc meanwhile
                    txn.put(u64key(c), data, db=store.db["payloads"])

        store.writer.call(op)
        fetched += sum(len(d) for _, d in got)
    return fetched
