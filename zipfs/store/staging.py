"""Recovery of the staging area after a crash: every file is exactly its last acknowledged version.

A version written through a mount lives in `staging/<sid>` with a journal row (zipfs.store.journal).
An inode points at a staged version only once that version was acknowledged (a successful
flush, fsync or close committed its row), and writes that would change acknowledged bytes go
to a new version (copy-on-write), so after a crash:
- a version its inode points at is cut back to its acknowledged size (bytes appended after the
  last acknowledgement were never acknowledged) and queued for ingest again;
- a version that was never acknowledged, or that its inode no longer points at, goes to
  `lost+found/` (nothing is deleted silently) and its inode keeps the content it had; a file
  created and never successfully closed loses its name;
- tombstones are finished (their files deleted), and staging files without a row go to lost+found.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from zipfs.store import inodes, journal
from zipfs.store.journal import LIVE, StagedRecord, staging_path
from zipfs.store.lmdb_store import Store
from zipfs.store.records import u64key

log = logging.getLogger("zipfs.staging")

LOST_FOUND = "lost+found"


def staging_dir(store: Store) -> Path:
    return store.path / journal.STAGING_DIR


@dataclass
class Recovery:
    """What recovery found and did, for the mount's log and for tests."""

    #: acknowledged versions their inodes point at: to ingest
    live: dict[int, StagedRecord] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    #: new files that never had a successful close: their names are gone
    unnamed: list[str] = field(default_factory=list)
    purged: int = 0


def _to_lost_found(store: Store, src: Path, hint: str) -> str:
    lost = store.path / LOST_FOUND
    lost.mkdir(mode=0o700, exist_ok=True)
    name = f"{src.name}-{time.strftime('%Y%m%d-%H%M%S')}-{hint.replace('/', '_') or 'unnamed'}"
    name = os.fsencode(name)[:200].decode("utf-8", "ignore")  # a name, whatever the hint's length
    os.replace(src, lost / name)
    return str(lost / name)


def recover(store: Store) -> Recovery:
    """Bring the journal, the inodes and the staging files back to agreement (writable mount start)."""
    sdir = staging_dir(store)
    sdir.mkdir(mode=0o700, exist_ok=True)
    out = Recovery()
    with store.read() as txn:
        rows = journal.records(store, txn)
        nodes = {sid: inodes.find(store, txn, r.ino) for sid, r in rows.items() if r.state == LIVE}
        hints = {sid: inodes.describe(store, txn, r.ino) for sid, r in rows.items() if r.state == LIVE}
    dead = [sid for sid, r in rows.items() if r.state != LIVE]
    out.purged = len(dead)
    journal.purge(store, dead)
    drop_rows: list[int] = []
    unname: list[inodes.Inode] = []
    for sid, node in nodes.items():
        r, f = rows[sid], staging_path(store, sid)
        if r.acked and node is not None and (node.content, node.content_id) == (inodes.STAGED, sid):
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                log.error("%s: its staged version #%d is missing from %s", hints[sid], sid, sdir)
                out.damaged.append(hints[sid])
                continue
            if size > r.size:
                os.truncate(f, r.size)
                out.truncated.append(hints[sid])
            elif size < r.size:
                log.error("%s: staged version #%d is shorter (%d) than acknowledged (%d)",
                          hints[sid], sid, size, r.size)
                out.damaged.append(hints[sid])
            out.live[sid] = r
            continue
        if f.exists():
            out.lost.append(_to_lost_found(store, f, hints[sid]))
        drop_rows.append(sid)
        if node is not None and node.content == inodes.NONE and r.created and not r.acked:
            unname.append(node)
            out.unnamed.append(hints[sid])
    for f in sdir.iterdir():
        if not f.name.isdigit() or int(f.name) not in rows:
            out.lost.append(_to_lost_found(store, f, "no-journal-record"))
    rel = inodes.Released()

    def op(txn: lmdb.Transaction) -> None:
        for sid in drop_rows:
            store.delete(txn, "staged", u64key(sid))
        for ino, (parent, name) in inodes.names_of(store, txn, {n.ino for n in unname}):
            now = inodes.find(store, txn, ino)
            if now is not None and now.content == inodes.NONE:
                inodes.unlink(store, txn, parent, name, time.time_ns(), rel)

    store.writer.call(op)
    journal.purge(store, rel.dead)
    for p in out.lost:
        log.warning("recovery: moved a staging file never acknowledged (or superseded) to %s", p)
    return out
