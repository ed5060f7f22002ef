"""Check a store's integrity: every record's checksum and structure, the inode table against its
directory entries, file versions against inodes and orphans, reference counts, the hash index,
and (with scrub) every chunk's decoded checksum. Repairs only what can be recomputed, and only
when asked; a damaged record is reported, never guessed at."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import lmdb

from zipfs.errors import StoreError, ZipfsError
from zipfs.read.cache import ChunkCache
from zipfs.read.chunks import ChunkSource
from zipfs.store import inodes, journal, models
from zipfs.store.lifecycle import expected_refs, file_records
from zipfs.store.lmdb_store import TABLES, Store
from zipfs.store.records import ChunkRecord, DamagedRecord, FileRecord, key_u64, u64key


@dataclass
class FsckReport:
    chunks: int = 0
    files: int = 0
    inodes: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    #: unreferenced chunks: not an error (gc frees them)
    garbage: int = 0
    scrubbed: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


@dataclass
class _Fixes:
    refs: dict[int, int] = field(default_factory=dict)
    orphan_payloads: list[int] = field(default_factory=list)
    orphan_locations: list[int] = field(default_factory=list)
    dangling_hashes: list[bytes] = field(default_factory=list)
    dangling_dirents: list[bytes] = field(default_factory=list)
    unowned_files: list[int] = field(default_factory=list)
    stale_orphans: list[int] = field(default_factory=list)
    stale_models: list[int] = field(default_factory=list)

    def any(self) -> bool:
        return any(vars(self).values())


def _records(store: Store, txn: lmdb.Transaction, problems: list[str]) -> None:
    """Every sealed record's checksum (a damaged one anywhere is a problem)."""
    for table in TABLES:
        if table == "payloads":
            continue
        for _ in store.scan(txn, table, on_damage=lambda k, e: problems.append(str(e))):
            pass


def _namespace(store: Store, txn: lmdb.Transaction, rep: FsckReport, fix: _Fixes,
               files: dict[int, FileRecord], orphans: dict[int, int]) -> None:
    problems = rep.problems
    nodes: dict[int, inodes.Inode] = {}
    for k, v in store.scan(txn, "inodes", on_damage=lambda k, e: None):
        try:
            nodes[key_u64(k)] = inodes.Inode.unpack(key_u64(k), v)
        except DamagedRecord as e:
            problems.append(str(e))
    rep.inodes = len(nodes)
    if inodes.ROOT not in nodes or not nodes[inodes.ROOT].is_dir:
        problems.append("the root directory's inode is missing or not a directory")
    links: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    dir_entry: dict[int, tuple[int, bytes]] = {}
    for k, v in store.scan(txn, "dirents", on_damage=lambda k, e: None):
        parent, name, child = key_u64(k[:8]), k[8:], key_u64(v) if len(v) == 8 else 0
        where = f"entry {name!r} of directory inode {parent}"
        if parent not in nodes or not nodes[parent].is_dir:
            problems.append(f"{where}: its directory is missing")
            fix.dangling_dirents.append(k)
        elif child not in nodes:
            problems.append(f"{where}: points at missing inode {child}")
            fix.dangling_dirents.append(k)
        else:
            links[child] += 1
            if nodes[child].is_dir:
                subdirs[parent] += 1
                if child in dir_entry:
                    problems.append(f"directory inode {child} has more than one name")
                dir_entry[child] = (parent, name)
    owner: dict[int, int] = {}
    live_rows = {sid: r for sid, r in journal.records(store, txn).items() if r.state == journal.LIVE}
    for ino, node in nodes.items():
        want = 2 + subdirs[ino] if node.is_dir else links[ino]
        if ino != inodes.ROOT and links[ino] == 0:
            problems.append(f"inode {ino} has no name (unreachable)")
        elif node.nlink != want:
            problems.append(f"inode {ino}: link count {node.nlink}, entries say {want}")
        if node.is_dir and ino != inodes.ROOT and dir_entry.get(ino) != (node.parent, node.name):
            problems.append(f"directory inode {ino}: its parent pointer does not match its entry")
        if node.content == inodes.STORED:
            fid = node.content_id
            if fid not in files:
                problems.append(f"{inodes.describe(store, txn, ino)}: its file version {fid} is missing")
            elif fid in owner or fid in orphans:
                problems.append(f"file version {fid} is used twice (inode {ino})")
            elif files[fid].size != node.size:
                problems.append(f"{inodes.describe(store, txn, ino)}: size {node.size}, its version has "
                                f"{files[fid].size}")
            owner[fid] = ino
        elif node.content == inodes.STAGED:
            r = live_rows.get(node.content_id)
            if r is None or not r.acked or r.ino != ino:
                problems.append(f"{inodes.describe(store, txn, ino)}: its staged version "
                                f"#{node.content_id} has no acknowledged journal record")
            elif not journal.staging_path(store, node.content_id).exists() \
                    and _still_staged(store, ino, node.content_id):  # not ingested since our snapshot
                problems.append(f"{inodes.describe(store, txn, ino)}: staging file of #{node.content_id} "
                                "is missing")
    for fid in files:
        if fid not in owner and fid not in orphans:
            problems.append(f"file version {fid} belongs to no inode")
            fix.unowned_files.append(fid)
    for fid in orphans:
        if fid not in files:
            problems.append(f"orphan {fid} has no file version")
            fix.stale_orphans.append(fid)
    for k, v in store.scan(txn, "models", on_damage=lambda k, e: None):
        try:
            m = models.Model.unpack(key_u64(k), v)
        except DamagedRecord as e:
            problems.append(str(e))
            continue
        if m.ino not in nodes:
            problems.append(f"model record of missing inode {m.ino}")
            fix.stale_models.append(m.ino)
    for k, _ in store.scan(txn, "xattrs", on_damage=lambda k, e: None):
        if key_u64(k[:8]) not in nodes:
            problems.append(f"extended attribute of missing inode {key_u64(k[:8])}")


def _still_staged(store: Store, ino: int, sid: int) -> bool:
    """Whether inode ino shows staged version sid now (an ingest commits, then removes the file)."""
    with store.read() as txn:
        return inodes.shows_staged(store, txn, ino, sid)


def _chunks(store: Store, txn: lmdb.Transaction, rep: FsckReport, fix: _Fixes,
            files: dict[int, FileRecord]) -> dict[int, ChunkRecord]:
    records = dict(store.iter_chunks(txn, on_damage=lambda k, e: rep.problems.append(
        f"chunk {key_u64(k)}: {e}")))
    expected = expected_refs(files, records)
    payload_ids = set(store.payload_ids(txn, on_damage=lambda k, e: rep.problems.append(str(e))))
    #: chunks whose payload only the store's remote holds (zipfs.remote.tables)
    remote_ids = {key_u64(k) for k, _ in store.scan(txn, "rlocs", on_damage=lambda k, e: rep.problems.append(
                  f"remote location of chunk {key_u64(k)}: {e}"))}
    hash_index: dict[bytes, int] = {}
    for k, v in store.scan(txn, "chunkhash", on_damage=lambda k, e: None):
        hash_index[k] = key_u64(v)
    rep.chunks = len(records)
    for cid, want in sorted(expected.items()):
        if cid not in records:
            rep.problems.append(f"chunk {cid} is referenced {want} times but missing")
    for cid, cr in sorted(records.items()):
        want = expected.get(cid, 0)
        if cr.refs != want:
            rep.problems.append(f"chunk {cid}: reference count {cr.refs}, recomputed {want}")
            fix.refs[cid] = want
        rep.garbage += want == 0
        if cid not in payload_ids and cid not in remote_ids:
            rep.problems.append(f"chunk {cid}: payload missing")
        if cr.base and cr.base in records and records[cr.base].base:
            rep.problems.append(f"chunk {cid}: base {cr.base} is itself a delta (depth > 1)")
        if hash_index.get(cr.hash) != cid and cr.hash not in hash_index:
            rep.problems.append(f"chunk {cid}: missing from the content-hash index")
    fix.orphan_payloads = sorted(payload_ids - records.keys())
    rep.problems += [f"payload {cid} has no chunk record" for cid in fix.orphan_payloads]
    fix.orphan_locations = sorted(remote_ids - records.keys())
    rep.problems += [f"remote location of chunk {cid} has no chunk record" for cid in fix.orphan_locations]
    for h, cid in hash_index.items():
        if cid not in records or records[cid].hash != h:
            rep.problems.append(f"hash index entry {h.hex()[:16]} points at the wrong chunk ({cid})")
            fix.dangling_hashes.append(h)
    return records


def _repair(store: Store, fix: _Fixes) -> list[str]:
    def op(txn: lmdb.Transaction) -> None:
        for cid, want in fix.refs.items():
            cr = store.chunk(txn, cid)
            cr.refs = want
            store.put(txn, "chunks", u64key(cid), cr.pack())
        for cid in fix.orphan_payloads:
            store.delete(txn, "payloads", u64key(cid))
        for cid in fix.orphan_locations:
            store.delete(txn, "rlocs", u64key(cid))
        for h in fix.dangling_hashes:
            store.delete(txn, "chunkhash", h)
        for k in fix.dangling_dirents:
            store.delete(txn, "dirents", k)
        for fid in fix.unowned_files:  # gc frees them once no reader pins inode 0 (none does)
            store.put(txn, "orphans", u64key(fid), u64key(0))
        for fid in fix.stale_orphans:
            store.delete(txn, "orphans", u64key(fid))
        for ino in fix.stale_models:
            store.delete(txn, "models", u64key(ino))

    store.writer.call(op, frees_space=True)
    return [f"{len(fix.refs)} reference counts set", f"{len(fix.orphan_payloads)} orphan payloads deleted",
            f"{len(fix.dangling_hashes)} bad hash index entries deleted",
            f"{len(fix.dangling_dirents)} dangling directory entries deleted",
            f"{len(fix.unowned_files)} file versions of no inode handed to gc",
            f"{len(fix.stale_orphans) + len(fix.stale_models)} stale orphan and model records deleted"]


def fsck(store: Store, scrub: bool = False, repair: bool = False,
         progress: Callable[[int], None] | None = None) -> FsckReport:
    rep = FsckReport()
    fix = _Fixes()
    try:
        store.check_tree()  # a damaged B-tree would abort LMDB's cursors below
    except StoreError as e:
        rep.problems.append(str(e))
        return rep
    with store.ingest_lock(exclusive=repair), store.read() as txn:
        _records(store, txn, rep.problems)
        files = file_records(store, txn, on_damage=lambda p, e: None)
        rep.files = len(files)
        orphans = {key_u64(k): key_u64(v) for k, v in store.scan(txn, "orphans", on_damage=lambda k, e: None)}
        _namespace(store, txn, rep, fix, files, orphans)
        records = _chunks(store, txn, rep, fix, files)
    if scrub:
        source = ChunkSource(store, ChunkCache(64 << 20))
        for cid in sorted(records):
            try:
                source.get(cid)
            except ZipfsError as e:
                rep.problems.append(f"chunk {cid}: {e}")
            rep.scrubbed += 1
            if progress:
                progress(records[cid].raw_len)
    if repair and fix.any():
        rep.repaired = _repair(store, fix)
    return rep
