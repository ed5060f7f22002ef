"""What the local store knows of its remote, in LMDB tables of its own (sealed like the rest).

    rindex   chunk hash -> the bucket entry of a chunk with those bytes (from pack indexes and
             manifests): dedup across machines
    rpacks   pack name -> the hashes of its chunks, once its index is in rindex (read once; when
             the index leaves the bucket, gc condemned the pack, and its entries leave rindex)
    rlocs    local chunk id -> (pack, offset, length, payload xxh3) of that chunk's own payload in
             the bucket: where to fetch it when the local store has no copy
    rmodels  model name -> manifest version this store shows (imported or pushed)
"""

from __future__ import annotations

import json
import struct

import lmdb

from zipfs.remote.config import RemoteError
from zipfs.remote.layout import Entry
from zipfs.store.lmdb_store import Store
from zipfs.store.records import u64key

_LOC = struct.Struct("<32sQQQ")


def entry(store: Store, txn: lmdb.Transaction, h: bytes) -> Entry | None:
    raw = store.get(txn, "rindex", h)
    return None if raw is None else Entry.from_row(json.loads(raw), f"local index of chunk {h.hex()[:16]}")


def put_entry(store: Store, txn: lmdb.Transaction, e: Entry, indexed: bool = False) -> None:
    """Remember e for its hash, a standalone entry over a delta (a base must be standalone);
    an entry from an index (indexed) also over one only a manifest named, in a pack no index
    here lists (repacked since, maybe)."""
    key = bytes.fromhex(e.hash)
    old = entry(store, txn, key)
    if old is not None and (not old.base or e.base):
        if not (indexed and old.pack != e.pack and store.get(txn, "rpacks", bytes.fromhex(old.pack)) is None):
            return
    store.put(txn, "rindex", key, json.dumps(e.row(), separators=(",", ":")).encode())


def usable(store: Store, txn: lmdb.Transaction, h: bytes) -> list[Entry] | None:
    """The entries a manifest needs to read the chunk with hash h from the bucket (its own, and
    its base's for a delta), or None when the bucket has no decodable copy of it."""
    e = entry(store, txn, h)
    if e is None:
        return None
    if not e.base:
        return [e]
    b = entry(store, txn, bytes.fromhex(e.base))
    return None if b is None or b.base else [e, b]


def location(store: Store, txn: lmdb.Transaction, chunk_id: int) -> tuple[str, int, int, int] | None:
    raw = store.get(txn, "rlocs", u64key(chunk_id))
    if raw is None:
        return None
    try:
        pack, off, length, pcheck = _LOC.unpack(raw)
    except struct.error:
        raise RemoteError(f"the bucket location of chunk {chunk_id} is malformed") from None
    return pack.hex(), off, length, pcheck


def put_location(store: Store, txn: lmdb.Transaction, chunk_id: int, e: Entry) -> None:
    store.put(txn, "rlocs", u64key(chunk_id), _LOC.pack(bytes.fromhex(e.pack), e.off, e.length, e.pcheck))


def model_version(store: Store, txn: lmdb.Transaction, name: str) -> str | None:
    raw = store.get(txn, "rmodels", name.encode("utf-8", "surrogateescape"))
    return None if raw is None else raw.decode().split(" ")[0]


def shown_models(store: Store, txn: lmdb.Transaction) -> dict[str, bool]:
    """Every model the store shows as the bucket has it: name -> whether that version is a removal."""
    return {k.decode("utf-8", "surrogateescape"): v.endswith(b" removed")
            for k, v in store.scan(txn, "rmodels")}


def set_model_version(store: Store, txn: lmdb.Transaction, name: str, version: str,
                      removed: bool = False) -> None:
    store.put(txn, "rmodels", name.encode("utf-8", "surrogateescape"),
              version.encode() + (b" removed" if removed else b""))


def forget_model_version(store: Store, txn: lmdb.Transaction, name: str) -> None:
    """The model here is now the store's own (changed here, not yet pushed): sync keeps it."""
    store.delete(txn, "rmodels", name.encode("utf-8", "surrogateescape"))


def known_packs(store: Store, txn: lmdb.Transaction) -> set[str]:
    return {k.hex() for k, _ in store.scan(txn, "rpacks")}


def add_pack(store: Store, txn: lmdb.Transaction, pack: str, entries: list[Entry]) -> None:
    """Remember a pack's index: its entries (for dedup) and which hashes it holds."""
    for e in entries:
        put_entry(store, txn, e, indexed=True)
    store.put(txn, "rpacks", bytes.fromhex(pack), b"".join(bytes.fromhex(e.hash) for e in entries))


def drop_entries(store: Store, txn: lmdb.Transaction, pack: str, hashes: set[str]) -> None:
    """Forget the entries of these hashes that point into pack (gone from the bucket's indexes),
    whether an index or only a manifest told us of them."""
    for h in hashes:
        e = entry(store, txn, bytes.fromhex(h))
        if e is not None and e.pack == pack:
            store.delete(txn, "rindex", bytes.fromhex(h))
    drop_pack(store, txn, pack)


def drop_pack(store: Store, txn: lmdb.Transaction, pack: str) -> None:
    """Forget a pack the bucket no longer indexes: its entries are no longer to be reused."""
    key = bytes.fromhex(pack)
    raw = store.get(txn, "rpacks", key)
    if raw is None:
        return
    for i in range(0, len(raw) - 31, 32):
        h = raw[i:i + 32]
        e = entry(store, txn, h)
        if e is not None and e.pack == pack:
            store.delete(txn, "rindex", h)
    store.delete(txn, "rpacks", key)


def packs_holding(store: Store, txn: lmdb.Transaction, h: bytes) -> list[str]:
    """The indexed packs that hold a chunk with hash h (a scan: only for chunks whose pack went)."""
    out = []
    for k, v in store.scan(txn, "rpacks"):
        if any(v[i:i + 32] == h for i in range(0, len(v) - 31, 32)):
            out.append(k.hex())
    return out
