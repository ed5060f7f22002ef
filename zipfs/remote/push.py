"""Upload a stored model to the bucket: missing payloads in packs, then file manifests, then a
new version of the model's manifest (the moment other machines see it).

Resumable by construction: a pack's chunks count as in the bucket once its index object is
there, so a push killed anywhere and run again uploads only the packs whose index did not land
(a pack without its index is garbage that `gc --remote` collects after the grace period).
"""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import lmdb
import xxhash

from zipfs import faults
from zipfs.errors import ZipfsError
from zipfs.remote import layout, tables
from zipfs.remote.attach import Remote
from zipfs.remote.client import MissingError
from zipfs.remote.config import RemoteError
from zipfs.remote.layout import FILES, INDEX, PACKS, Entry, FileManifest, ModelManifest
from zipfs.store import inodes, models
from zipfs.store.lmdb_store import Store

#: payload bytes per pack: one object per chunk would be thousands of PUTs per model and as many
#: objects to list and collect; tens of MiB keep requests few while a failed PUT costs little
PACK_TARGET = 32 << 20
UPLOADERS = 4
#: index objects read at once when learning what the bucket holds
INDEX_READERS = 8


@dataclass
class PushReport:
    name: str
    version: str = ""
    files: int = 0
    chunks: int = 0
    uploaded_chunks: int = 0
    uploaded_bytes: int = 0
    packs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def sync_index(store: Store, remote: Remote) -> int:
    """Learn every pack index in the bucket not yet read here, and forget the packs whose index
    left it (condemned by gc: their chunks must not be reused); how many indexes were new."""
    listed = {o.key[len(INDEX):] for o in remote.bucket.list(INDEX) if layout.is_name(o.key[len(INDEX):])}
    with store.read() as txn:
        known = tables.known_packs(store, txn)
    gone, new = known - listed, sorted(listed - known)
    if gone:
        store.writer.call(lambda txn: [tables.drop_pack(store, txn, p) for p in gone])

    def read(pack: str) -> list[Entry]:
        return layout.parse_index(remote.bucket.get(INDEX + pack), INDEX + pack)

    with ThreadPoolExecutor(INDEX_READERS) as pool:
        for i in range(0, len(new), 64):
            batch = new[i:i + 64]
            found = list(pool.map(read, batch))

            def op(txn: lmdb.Transaction, batch=batch, found=found) -> None:
                for pack, entries in zip(batch, found, strict=True):
                    tables.add_pack(store, txn, pack, entries)

            store.writer.call(op)
    return len(new)


def _model_files(store: Store, txn: lmdb.Transaction, name: str) -> tuple[inodes.Inode, list]:
    """The model's top inode and (relative path, inode) of it and everything under it."""
    top = inodes.resolve(store, txn, name)
    out = [("", top)]
    prefix = len(name.strip("/")) + 1
    out += [(p[prefix:], node) for p, _, _, node in inodes.walk_entries(store, txn, name)]
    for p, node in out:
        if node.is_reg and node.content != inodes.STORED:
            raise ZipfsError(f"{name}/{p}: still being ingested; push it once the mount has stored it")
    return top, out


def _needs_upload(store: Store, txn: lmdb.Transaction, cids: set[int]) -> list[int]:
    """The chunks the bucket has no decodable copy of, bases before their deltas."""
    up: dict[int, None] = {}
    for cid in sorted(cids):
        rec = store.chunk(txn, cid)
        if tables.usable(store, txn, rec.hash) is not None:
            continue
        if rec.base:
            base = store.chunk(txn, rec.base)
            e = tables.entry(store, txn, base.hash)
            if e is None or e.base:
                up[rec.base] = None
        up[cid] = None
    bases = [c for c in up if not store.chunk(txn, c).base]
    return bases + [c for c in up if store.chunk(txn, c).base]


def _upload(store: Store, remote: Remote, todo: list[int], report: PushReport,
            progress: Callable[[int], None]) -> None:
    """Pack the payloads of todo and upload them, UPLOADERS packs at a time; each pack's
    entries are recorded here once its index object is in the bucket."""

    def send(pack: bytes, rows: list[tuple[int, object, bytes, int, int]]) -> None:
        name = blake3.blake3(pack).hexdigest()
        entries = [(cid, Entry.of(rec, bh, name, off, pc)) for cid, rec, bh, off, pc in rows]
        remote.bucket.refresh(PACKS + name, pack)  # the same bytes again (a resumed push): age restarts
        remote.bucket.put(INDEX + name, layout.index_object(name, len(pack), [e for _, e in entries]),
                          create=True)

        faults.point("push-pack")

        def op(txn: lmdb.Transaction) -> None:
            tables.add_pack(store, txn, name, [e for _, e in entries])
            for cid, e in entries:
                tables.put_location(store, txn, cid, e)

        store.writer.call(op)
        report.packs += 1
        report.uploaded_bytes += len(pack)
        report.uploaded_chunks += len(rows)
        progress(len(pack))

    slots = threading.Semaphore(UPLOADERS + 1)  # packs in memory: those uploading, one filling
    with ThreadPoolExecutor(UPLOADERS, thread_name_prefix="zipfs-upload") as pool:
        futures = []
        buf, rows = bytearray(), []
        for i, cid in enumerate(todo):
            with store.read() as txn:
                rec = store.chunk(txn, cid)
                payload = bytes(store.payload(txn, cid))
                base_hash = store.chunk(txn, rec.base).hash if rec.base else b""
            rows.append((cid, rec, base_hash, len(buf), xxhash.xxh3_64_intdigest(payload)))
            buf += payload
            if len(buf) >= PACK_TARGET or i == len(todo) - 1:
                if remote.stopping.is_set():
                    raise RemoteError("push stopped: the process is shutting down (run it again to resume)")
                slots.acquire()
                for f in futures:  # the first failure stops the push
                    if f.done():
                        f.result()
                fut = pool.submit(send, bytes(buf), rows)
                fut.add_done_callback(lambda _: slots.release())
                futures.append(fut)
                buf, rows = bytearray(), []
        for f in futures:
            f.result()


def _file_manifest(store: Store, txn: lmdb.Transaction, file_id: int) -> FileManifest:
    frec = store.file(txn, file_id)
    chunks: dict[str, int] = {}
    rows: list[Entry] = []
    refs = []
    for cid in frec.chunk_ids.tolist():
        rec = store.chunk(txn, cid)
        found = tables.usable(store, txn, rec.hash)
        if found is None:
            raise RemoteError(f"chunk {cid} is not in the bucket after its upload")
        for e in reversed(found):  # the base first
            if e.hash not in chunks:
                chunks[e.hash] = len(rows)
                rows.append(e)
        refs.append(chunks[rec.hash.hex()])
    tensors = [[t.name, t.dtype, t.shape, t.start, t.end, t.digest] for t in frec.tensors]
    return FileManifest(frec.size, frec.sha256, frec.kind, frec.note, tensors, frec.offsets.tolist(), refs,
                        rows)


def _entries(store: Store, remote: Remote, name: str,
             found: list) -> tuple[list[dict], dict[str, set[str]], dict[str, bytes]]:
    """The model manifest's entries, the packs they read (with the hashes read from each), and
    the file manifests (uploaded on the way, or rewritten when the bucket had them: their age
    restarts, see Bucket.refresh)."""
    entries: list[dict] = []
    packs: dict[str, set[str]] = {}
    written: dict[str, bytes] = {}
    with store.read() as txn:
        for rel, node in found:
            e = {"path": rel, "mode": stat.S_IMODE(node.mode), "uid": node.uid, "gid": node.gid,
                 "mtime_ns": node.mtime_ns}
            if node.is_dir:
                e["type"] = "dir"
            elif node.is_link:
                e.update(type="link", target=node.target.decode("utf-8", "surrogateescape"))
            else:
                fm = _file_manifest(store, txn, node.content_id)
                for c in fm.chunks:
                    packs.setdefault(c.pack, set()).add(c.hash)
                data = fm.encode()
                key = blake3.blake3(data).hexdigest()
                remote.bucket.refresh(FILES + key, data)
                written[key] = data
                e.update(type="file", file=key, size=node.size)
            entries.append(e)
    return entries, packs, written


def _still_indexed(remote: Remote, pack: str) -> bool:
    """Whether the pack is still indexed (not condemned by gc); its index is rewritten so that
    it is young again and gc leaves it alone for the grace period this push needs."""
    try:
        data = remote.bucket.get(INDEX + pack)
    except MissingError:
        return False
    remote.bucket.put(INDEX + pack, data)
    return True


def publish(store: Store, remote: Remote, manifest: ModelManifest) -> str:
    """Write a new version of the model's manifest: from now on other machines see it."""
    version = layout.new_version(remote.cfg.writer)
    manifest.created_ns = layout.version_ns(version)
    remote.bucket.put(layout.model_prefix(manifest.name) + version, manifest.encode(), create=True)
    store.writer.call(lambda txn: tables.set_model_version(store, txn, manifest.name, version,
                                                            removed=manifest.deleted))
    return version


def push(store: Store, remote: Remote, name: str,
         progress: Callable[[int], None] = lambda _: None) -> PushReport:
    """Upload the model at name (a directory or one file) and publish a new manifest version.

    Before publishing, every pack the manifests read is checked to be still indexed: gc may have
    condemned one whose chunks this push reused (it held only garbage until now). Those chunks
    are uploaded again. gc deletes a condemned pack only a grace period later, and restores it
    if a manifest written meanwhile reads it, so a push that publishes within the grace period
    of its check never loses a chunk."""
    t0 = time.perf_counter()
    report = PushReport(name)
    for _ in range(3):
        sync_index(store, remote)
        with store.read() as txn:
            top, found = _model_files(store, txn, name)
            found = [(rel, node) for rel, node in found if node.is_dir or node.is_link or node.is_reg]
            cids: set[int] = set()
            for _, node in found:
                if node.is_reg:
                    cids.update(store.file(txn, node.content_id).chunk_ids.tolist())
            todo = _needs_upload(store, txn, cids)
            report.chunks, report.files = len(cids), sum(node.is_reg for _, node in found)
        _upload(store, remote, todo, report, progress)
        entries, packs, written = _entries(store, remote, name, found)
        gone = [p for p in sorted(packs) if not _still_indexed(remote, p)]
        if not gone:
            break
        drop = {p: packs[p] for p in gone}

        def forget(txn: lmdb.Transaction, drop: dict[str, set[str]] = drop) -> None:
            for p, hashes in drop.items():
                tables.drop_entries(store, txn, p, hashes)

        store.writer.call(forget)
    else:
        raise RemoteError(f"{name}: the bucket's gc keeps condemning packs this push reads; try again")
    with store.read() as txn:
        m = models.get(store, txn, top.ino)
        base = ""
        if m is not None and m.base:
            bnode = inodes.find(store, txn, m.base)
            base = inodes.path_of(store, txn, bnode) if bnode is not None else ""
    report.version = publish(store, remote, ModelManifest(name, remote.cfg.writer, 0, base,
                                                          m.reason if m is not None else "", entries))
    for key, data in written.items():  # a gc that decided before the refresh may have taken one
        if not remote.bucket.exists(FILES + key):
            remote.bucket.put(FILES + key, data)
    report.seconds = time.perf_counter() - t0
    return report


def push_removal(store: Store, remote: Remote, name: str) -> str:
    """Publish that the model is gone (a version with no entries, marked deleted)."""
    return publish(store, remote, ModelManifest(name, remote.cfg.writer, 0, "", "", [], deleted=True))
