"""The staging journal: files written through the mount, kept as plain files until ingested.

A staged file lives at `staging/<sid>` under the store (same filesystem, so nothing is copied
twice), named by its staging id, never by its path: renames only move the namespace entry. The
journal (LMDB table `staged`, sid -> StagedRecord) says what was acknowledged: `size` is what the
last successful flush/fsync covered. A record with `acked` false belongs to a file whose writer
never got a successful close; recovery moves such files to `lost+found/`, it never shows them
half written. An ingest commit, and a removal, turn the record into a tombstone (state "dead")
in the same transaction that changes the namespace; the staging file is deleted after that
commit, then the record. Recovery finishes whatever a crash interrupted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lmdb

from zipfs.errors import NamespaceError, ZipfsError
from zipfs.store import names
from zipfs.store.lmdb_store import Store
from zipfs.store.records import STAGED, NsEntry, key_u64, ns_unpack, u64key

log = logging.getLogger("zipfs.staging")

STAGING_DIR = "staging"
LOST_FOUND = "lost+found"
LIVE, DEAD = "live", "dead"
#: the meta counter of staging ids
NEXT_SID = b"next_staged"


@dataclass
class StagedRecord:
    """Journal row of one staged file."""

    path: str
    size: int = 0
    acked: bool = False
    mtime_ns: int = 0
    state: str = LIVE  # DEAD: ingested or removed; its staging file is being deleted

    def pack(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> StagedRecord:
        try:
            return cls(**json.loads(bytes(raw)))
        except (ValueError, TypeError):
            raise ZipfsError("staging journal record is malformed; run zipfs fsck") from None


def staging_dir(store: Store) -> Path:
    return store.path / STAGING_DIR


def staging_path(store: Store, sid: int) -> Path:
    return staging_dir(store) / str(sid)


def get(txn: lmdb.Transaction, store: Store, sid: int) -> StagedRecord | None:
    raw = txn.get(u64key(sid), db=store.db["staged"])
    return StagedRecord.unpack(raw) if raw is not None else None


def put(txn: lmdb.Transaction, store: Store, sid: int, rec: StagedRecord) -> None:
    txn.put(u64key(sid), rec.pack(), db=store.db["staged"])


def records(txn: lmdb.Transaction, store: Store) -> dict[int, StagedRecord]:
    return {key_u64(bytes(k)): StagedRecord.unpack(v) for k, v in txn.cursor(db=store.db["staged"])}


def ensure_parents(txn: lmdb.Transaction, store: Store, path: str) -> None:
    """Create the directories above path; refuse when one of them is not a directory."""
    for parent in names.parents(path):
        raw = txn.get(names.encode(parent), db=store.db["ns"])
        if raw is None:
            txn.put(names.encode(parent), NsEntry(b"D").pack(), db=store.db["ns"])
        elif not ns_unpack(raw).is_dir:
            raise ZipfsError(f"{path}: {parent} is not a directory")


def put_new(txn: lmdb.Transaction, store: Store, path: str, entry: NsEntry) -> None:
    """Add a namespace entry where there is none (EEXIST otherwise), with its directories."""
    if path == "" or txn.get(names.encode(path), db=store.db["ns"]) is not None:
        raise NamespaceError(errno.EEXIST, f"{path or '/'}: already exists")
    ensure_parents(txn, store, path)
    txn.put(names.encode(path), entry.pack(), db=store.db["ns"])


def create(txn: lmdb.Transaction, store: Store, path: str) -> int:
    """Journal a new, empty, unacknowledged staged file at path; return its staging id."""
    sid = store.next_id(txn, NEXT_SID)
    put_new(txn, store, path, NsEntry(STAGED, sid))
    put(txn, store, sid, StagedRecord(path, mtime_ns=time.time_ns()))
    return sid


def ack(txn: lmdb.Transaction, store: Store, sid: int, size: int, mtime_ns: int) -> None:
    """Record that the staging file's first `size` bytes are durable and acknowledged."""
    rec = get(txn, store, sid)
    if rec is None or rec.state != LIVE:
        raise ZipfsError(f"staged file #{sid} is no longer in the journal")
    rec.size, rec.acked, rec.mtime_ns = size, True, mtime_ns
    put(txn, store, sid, rec)


def tombstone(txn: lmdb.Transaction, store: Store, sid: int) -> None:
    """Mark a staged file's content as no longer needed (ingested or removed)."""
    rec = get(txn, store, sid)
    if rec is not None:
        rec.state = DEAD
        put(txn, store, sid, rec)


def current_path(txn: lmdb.Transaction, store: Store, sid: int) -> str:
    """Where staged file sid is in the namespace now; ZipfsError when it was removed or replaced."""
    rec = get(txn, store, sid)
    if rec is None or rec.state != LIVE:
        raise ZipfsError(f"staged file #{sid} was removed")
    raw = txn.get(names.encode(rec.path), db=store.db["ns"])
    if raw is None or ns_unpack(raw) != NsEntry(STAGED, sid):
        raise ZipfsError(f"staged file #{sid}: the journal and the namespace disagree about {rec.path}")
    return rec.path


def purge(store: Store, sids: list[int]) -> None:
    """Delete the staging files of tombstoned records, then the records (after their commit)."""
    if not sids:
        return
    for sid in sids:
        staging_path(store, sid).unlink(missing_ok=True)

    def op(txn: lmdb.Transaction) -> None:
        for sid in sids:
            rec = get(txn, store, sid)
            if rec is not None and rec.state != LIVE:
                txn.delete(u64key(sid), db=store.db["staged"])

    store.writer.call(op)


@dataclass
class Recovery:
    """What recovery found and did, for the mount's log and for tests."""

    live: dict[int, StagedRecord] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    purged: int = 0


def _to_lost_found(store: Store, src: Path, hint: str) -> str:
    lost = store.path / LOST_FOUND
    lost.mkdir(exist_ok=True)
    name = f"{src.name}-{time.strftime('%Y%m%d-%H%M%S')}-{hint.replace('/', '_') or 'unnamed'}"[:240]
    os.replace(src, lost / name)
    return str(lost / name)


def recover(store: Store) -> Recovery:
    """Bring the journal and the staging files back to agreement after a crash (mount start).

    - tombstones: their staging files and records are deleted;
    - unacknowledged files (no successful close ever): moved to lost+found, name removed;
    - acknowledged files: cut back to their acknowledged size (bytes past it were never
      acknowledged); a staging file shorter than that is reported as damaged and kept;
    - staging files without a record, and namespace entries without one: lost+found / removed.
    """
    sdir = staging_dir(store)
    sdir.mkdir(exist_ok=True)
    out = Recovery()
    with store.read() as txn:
        journal = records(txn, store)
        staged_names = {path: e.id for path, e in store.walk(txn) if e.kind == STAGED}
    dead = [sid for sid, r in journal.items() if r.state != LIVE]
    out.purged = len(dead)
    purge(store, dead)
    drop_names: list[str] = []
    for sid, r in journal.items():
        if r.state != LIVE:
            continue
        f = staging_path(store, sid)
        if not r.acked:
            if f.exists():
                out.lost.append(_to_lost_found(store, f, r.path))
            drop_names.append(r.path)
            continue
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            log.error("staged file %s (#%d): its staging file is missing; removing the name", r.path, sid)
            out.damaged.append(r.path)
            drop_names.append(r.path)
            continue
        if size > r.size:
            os.truncate(f, r.size)
            out.truncated.append(r.path)
        elif size < r.size:
            log.error("staged file %s (#%d) is shorter (%d) than acknowledged (%d)",
                      r.path, sid, size, r.size)
            out.damaged.append(r.path)
        out.live[sid] = r
    known = set(journal)
    for f in sdir.iterdir():
        if not f.name.isdigit() or int(f.name) not in known:
            out.lost.append(_to_lost_found(store, f, "no-journal-record"))
    drop_names += [p for p, sid in staged_names.items() if sid not in out.live]
    drop_sids = [sid for sid, r in journal.items() if r.state == LIVE and sid not in out.live]

    def op(txn: lmdb.Transaction) -> None:
        for path in drop_names:
            raw = txn.get(names.encode(path), db=store.db["ns"])
            if raw is not None and ns_unpack(raw).kind == STAGED:
                txn.delete(names.encode(path), db=store.db["ns"])
        for sid in drop_sids:
            txn.delete(u64key(sid), db=store.db["staged"])

    store.writer.call(op)
    for p in out.lost:
        log.warning("recovery: moved an unacknowledged staging file to %s", p)
    return out
