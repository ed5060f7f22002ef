"""The staging journal: one row per version of a file's content written through a mount.

A version lives in `staging/<sid>` until it is ingested. Its row says which inode it belongs to
and what of it is acknowledged: `size` is what the last successful flush/fsync covered, and
`acked` is false until then. An inode points at a version only once that version is
acknowledged; until then the inode keeps its previous content. A version no longer needed
(ingested, superseded, its inode removed) becomes a tombstone in the same transaction that
changed the inode; its staging file is deleted after that commit, then the row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb

from zipfs.store.records import DamagedRecord, key_u64, u64key

if TYPE_CHECKING:
    from zipfs.store.lmdb_store import Store

LIVE, DEAD = "live", "dead"
STAGING_DIR = "staging"
#: the meta counter of staging ids
NEXT_SID = b"next_staged"


@dataclass
class StagedRecord:
    """Journal row of one staged version."""

    ino: int
    size: int = 0
    acked: bool = False
    state: str = LIVE  # DEAD: ingested, superseded or removed; its staging file is being deleted
    #: the version of a file created with it (create(2)): until acknowledged, the file has no
    #: content of its own, and a crash before then takes its name away
    created: bool = False

    def pack(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def unpack(cls, raw: bytes) -> StagedRecord:
        try:
            rec = cls(**json.loads(raw))
        except (ValueError, TypeError):
            raise DamagedRecord("staging journal record is malformed") from None
        if not (isinstance(rec.ino, int) and isinstance(rec.size, int) and rec.size >= 0
                and rec.state in (LIVE, DEAD) and isinstance(rec.created, bool)):
            raise DamagedRecord("staging journal record is malformed")
        return rec


def get(store: Store, txn: lmdb.Transaction, sid: int) -> StagedRecord | None:
    raw = store.get(txn, "staged", u64key(sid))
    return StagedRecord.unpack(raw) if raw is not None else None


def put(store: Store, txn: lmdb.Transaction, sid: int, rec: StagedRecord) -> None:
    store.put(txn, "staged", u64key(sid), rec.pack())


def new(store: Store, txn: lmdb.Transaction, ino: int, created: bool = False) -> int:
    """Journal a new, empty, unacknowledged version of inode ino; its staging id."""
    sid = store.next_id(txn, NEXT_SID)
    store.put(txn, "staged", u64key(sid), StagedRecord(ino, created=created).pack(), overwrite=False)
    return sid


def records(store: Store, txn: lmdb.Transaction) -> dict[int, StagedRecord]:
    return {key_u64(k): StagedRecord.unpack(v) for k, v in store.scan(txn, "staged")}


def tombstone(store: Store, txn: lmdb.Transaction, sid: int, dead: list[int]) -> None:
    """Mark a version as no longer needed; its staging file goes once the caller has committed."""
    rec = get(store, txn, sid)
    if rec is not None and rec.state == LIVE:
        rec.state = DEAD
        put(store, txn, sid, rec)
        dead.append(sid)


def tombstone_inode(store: Store, txn: lmdb.Transaction, ino: int, dead: list[int]) -> None:
    """Tombstone every live version of inode ino (it is being removed)."""
    for sid, rec in records(store, txn).items():
        if rec.ino == ino and rec.state == LIVE:
            tombstone(store, txn, sid, dead)


def staging_path(store: Store, sid: int) -> Path:
    return store.path / STAGING_DIR / str(sid)


def purge(store: Store, sids: list[int]) -> None:
    """Delete the staging files of tombstoned versions, then their rows (after the commit that
    tombstoned them; a crash in between leaves tombstones that the next purge finishes)."""
    if not sids:
        return
    for sid in sids:
        staging_path(store, sid).unlink(missing_ok=True)

    def op(txn: lmdb.Transaction) -> None:
        for sid in sids:
            rec = get(store, txn, sid)
            if rec is not None and rec.state != LIVE:
                store.delete(txn, "staged", u64key(sid))

    store.writer.call(op, frees_space=True)
