"""The filesystem view of a store, without FUSE: inodes, lookups, listings, file layouts.

Usable as a library (the way ratarmount's core works without FUSE); the FUSE operations call it
from worker threads. Inode numbers are the store's own (the root is 1), stable across mounts and
never reused, so the kernel's idea of an inode and the store's always agree.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from zipfs.errors import NotFoundError
from zipfs.read.reader import FileLayout, layout_of
from zipfs.store import inodes, names
from zipfs.store.inodes import Inode
from zipfs.store.lmdb_store import Store
from zipfs.store.records import TensorEntry, key_u64, u64key

log = logging.getLogger("zipfs.mount")


@dataclass
class Content:
    """What reads of a regular file come from: its stored layout, or a staged version's id."""

    layout: FileLayout | None
    tensors: list[TensorEntry]
    sha256: str | None
    staged: int = 0


class Namespace:
    """Metadata reads of a store's inode table. Thread-safe; every method is a short LMDB read."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def inode(self, ino: int) -> Inode:
        with self.store.read() as txn:
            return inodes.get(self.store, txn, ino)

    def find(self, ino: int) -> Inode | None:
        with self.store.read() as txn:
            return inodes.find(self.store, txn, ino)

    def stand_in_root(self) -> Inode:
        """What the root shows when its record is damaged: a directory owned by the store's owner,
        so the mount point still answers and every intact file below it stays reachable."""
        st = os.stat(self.store.path)
        return Inode(inodes.ROOT, stat.S_IFDIR | 0o755, st.st_uid, st.st_gid, 2)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        """The inode of name in directory parent, or None. NamespaceError for a name no entry can
        have (over 255 bytes: ENAMETOOLONG)."""
        names.check_component(name)
        with self.store.read() as txn:
            ino = inodes.lookup(self.store, txn, parent, name)
            return inodes.get(self.store, txn, ino) if ino is not None else None

    def listdir(self, ino: int) -> list[tuple[bytes, Inode]]:
        """The entries of a directory; a damaged entry is logged and left out, the rest listed."""
        out = []

        def damaged(k: bytes, e: Exception) -> None:
            log.error("directory inode %d: entry %r skipped: %s", ino, k[8:], e)

        with self.store.read() as txn:
            inodes.get(self.store, txn, ino)
            for name, child in inodes.entries(self.store, txn, ino, on_damage=damaged):
                try:
                    out.append((name, inodes.get(self.store, txn, child)))
                except (NotFoundError, inodes.DamagedRecord) as e:
                    damaged(u64key(ino) + name, e)
        return out

    def describe(self, ino: int) -> str:
        """A path for messages ('inode N' when it has none)."""
        with self.store.read() as txn:
            return inodes.describe(self.store, txn, ino)

    def content(self, node: Inode) -> Content:
        """Where a regular file's bytes are now."""
        with self.store.read() as txn:
            if node.content == inodes.STAGED:
                return Content(None, [], None, staged=node.content_id)
            path = inodes.describe(self.store, txn, node.ino)
            layout = layout_of(self.store, txn, node, path)
            if node.content == inodes.NONE:
                return Content(layout, [], None)
            rec = self.store.file(txn, node.content_id)
            return Content(layout, rec.tensors, rec.sha256)

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        with self.store.read() as txn:
            return {k[8:]: v for k, v in self.store.scan(txn, "xattrs", u64key(ino))}

    def inodes_with_xattrs(self) -> set[int]:
        """Inodes with at least one stored xattr (one whose record is damaged included)."""
        with self.store.read() as txn:
            out = set()
            for k, _ in self.store.scan(txn, "xattrs", on_damage=lambda k, e: out.add(key_u64(k[:8]))):
                out.add(key_u64(k[:8]))
            return out

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        with self.store.read() as txn:
            return self.store.get(txn, "xattrs", u64key(ino) + name)
