"""Model records: a model is a directory (or a single file) ingested as one unit, with its base.

Keyed by the model's inode, so renaming a model (or its base) changes nothing here; names are
looked up from the inode table when shown.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import lmdb

from zipfs.errors import NotFoundError, ZipfsError
from zipfs.store import hub, inodes, names
from zipfs.store.records import DamagedRecord, key_u64, u64key

if TYPE_CHECKING:
    from zipfs.store.lmdb_store import Store


@dataclass
class Model:
    ino: int
    #: the base model's inode (0: none)
    base: int = 0
    reason: str = ""
    ratio: float | None = None
    ingested: float = 0.0
    size: int = 0
    new_bytes: int = 0
    delta_chunks: int = 0

    def pack(self) -> bytes:
        rec = asdict(self)
        del rec["ino"]
        return json.dumps(rec, separators=(",", ":")).encode()

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> Model:
        try:
            m = cls(ino, **json.loads(raw))
        except (ValueError, TypeError):
            raise DamagedRecord(f"model record of inode {ino} is malformed") from None
        if not (isinstance(m.base, int) and isinstance(m.size, int) and isinstance(m.new_bytes, int)):
            raise DamagedRecord(f"model record of inode {ino} is malformed")
        return m


def get(store: Store, txn: lmdb.Transaction, ino: int) -> Model | None:
    raw = store.get(txn, "models", u64key(ino))
    return Model.unpack(ino, raw) if raw is not None else None


def put(store: Store, txn: lmdb.Transaction, m: Model) -> None:
    store.put(txn, "models", u64key(m.ino), m.pack())


def locate(store: Store, txn: lmdb.Transaction, path: str) -> str:
    """path, or the same path below the hub repo folder its first components name as a hub id
    ('org/name/refs/main' -> 'models--org--name/refs/main'): what a user types after `ls` shows
    the repo as org/name. NotFoundError when neither exists."""
    try:
        inodes.resolve(store, txn, path)
        return path
    except NotFoundError as e:
        missing = e
    parts = path.strip("/").split("/")
    for k in (2, 1, 3):  # org/name, a bare name, datasets/org/name
        if k > len(parts):
            continue
        cand = "/".join([hub.folder("/".join(parts[:k])), *parts[k:]])
        try:
            inodes.resolve(store, txn, cand)
        except ZipfsError:
            continue
        return cand
    raise missing


def home(store: Store, txn: lmdb.Transaction, node: inodes.Inode) -> inodes.Inode:
    """The model a file written through a mount belongs to: the nearest directory above it that
    is a model; else the nearest hub repo folder above it (`models--org--name/blobs/...`); else
    its own directory (a file at the root: itself). `cp -r ft MNT/me/ft` makes me/ft the model,
    as `zipfs ingest ft --name me/ft` does, and its subdirectories stay part of it."""
    if node.parent == inodes.ROOT:
        return node
    parent = inodes.get(store, txn, node.parent)
    repo, seen = None, set()
    d: inodes.Inode | None = parent
    while d is not None and d.ino != inodes.ROOT and d.ino not in seen:  # a loop is damage: stop
        if get(store, txn, d.ino) is not None:
            return d
        seen.add(d.ino)
        up = inodes.find(store, txn, d.parent)
        up_name = up.name if up is not None and up.ino != inodes.ROOT else b""
        if repo is None and hub.repo_of(names.show(up_name + b"/" + d.name)) is not None:
            repo = d
        d = up
    return repo or parent


def named(store: Store, txn: lmdb.Transaction,
          on_damage: inodes.OnDamage | None = None) -> dict[str, Model]:
    """Every model by its path now (models whose inode is gone are left out)."""
    out: dict[str, Model] = {}
    report = None if on_damage is None else lambda k, e: on_damage(f"model record {key_u64(k)}", e)
    for k, v in store.scan(txn, "models", on_damage=report):
        try:
            m = Model.unpack(key_u64(k), v)
            node = inodes.find(store, txn, m.ino)
            if node is not None:
                out[inodes.path_of(store, txn, node)] = m
        except (DamagedRecord, NotFoundError) as e:
            if on_damage is None:
                raise
            on_damage(f"model record {key_u64(k)}", e)
    return out
