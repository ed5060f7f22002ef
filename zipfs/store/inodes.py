"""The namespace as an inode table: inodes by number, directory entries keyed by (parent, name).

Keys stay far below LMDB's 511-byte limit (8 + at most 255 bytes) whatever the path length, a
directory rename is one entry and one inode record, and hard links are just two entries. Each
inode carries mode, owner, times and its content: nothing, a stored file version (a file id),
or a staged version written through a mount (a staging id). Directories and files also record
where their last name is (parent and name), so paths can be rebuilt from a number.

Every function here runs inside a write (or read) transaction and enforces what POSIX says
(EEXIST, ENOTEMPTY, EISDIR, EINVAL, ...) with NamespaceError, which the mount turns into that
errno. Content that an inode lets go of is never deleted here: a file version becomes an
orphan (kept while its inode is pinned by a reader, freed by gc), a staged version a tombstone
in the journal whose file the caller deletes after the commit (`Released.dead`).
"""

from __future__ import annotations

import errno
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb

from zipfs.errors import NamespaceError, NotFoundError
from zipfs.store import journal, names
from zipfs.store.records import DamagedRecord, key_u64, u64key

if TYPE_CHECKING:
    from zipfs.store.lmdb_store import Store

ROOT = 1
NEXT_INO = b"next_ino"
#: what an inode's content is
NONE, STORED, STAGED = 0, 1, 2
_KINDS = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
_HEAD = struct.Struct("<IIIIQqqqQBQQH")
#: called with the path (or key) and error of a damaged record met while walking; the walk goes on
OnDamage = Callable[[str, Exception], None]


@dataclass
class Inode:
    """One inode: what stat shows, and what its content is."""

    ino: int
    mode: int  # file type and permission bits, as st_mode
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    size: int = 0
    content: int = NONE
    content_id: int = 0
    #: where the inode's last name is: its directory and its name there (for paths and messages)
    parent: int = 0
    name: bytes = b""
    target: bytes = b""  # a symbolic link's target

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def pack(self) -> bytes:
        return _HEAD.pack(self.mode, self.uid, self.gid, self.nlink, self.rdev, self.atime_ns, self.mtime_ns,
                          self.ctime_ns, self.size, self.content, self.content_id, self.parent,
                          len(self.name)) + self.name + self.target

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> Inode:
        try:
            *fields, nlen = _HEAD.unpack_from(raw, 0)
        except struct.error:
            raise DamagedRecord(f"inode {ino} is malformed") from None
        name = raw[_HEAD.size:_HEAD.size + nlen]
        node = cls(ino, *fields, name=name, target=raw[_HEAD.size + nlen:])
        fmt = stat.S_IFMT(node.mode)
        ok = (fmt in _KINDS and len(name) == nlen <= names.MAX_COMPONENT
              and node.content in (NONE, STORED, STAGED)
              and (node.content == NONE or fmt == stat.S_IFREG) and (not node.target or fmt == stat.S_IFLNK)
              and (node.nlink >= 2 if fmt == stat.S_IFDIR else node.nlink >= 1))
        if not ok:
            raise DamagedRecord(f"inode {ino} is malformed")
        return node


@dataclass
class Released:
    """What a namespace change let go of, for the caller to finish after its commit."""

    #: staging ids tombstoned: delete their staging files, then their rows (journal purge)
    dead: list[int] = field(default_factory=list)
    #: inodes removed for good (their last name went)
    removed: list[int] = field(default_factory=list)


# ---- reading ----

def find(store: Store, txn: lmdb.Transaction, ino: int) -> Inode | None:
    raw = store.get(txn, "inodes", u64key(ino))
    return Inode.unpack(ino, raw) if raw is not None else None


def get(store: Store, txn: lmdb.Transaction, ino: int) -> Inode:
    node = find(store, txn, ino)
    if node is None:
        raise NotFoundError(f"inode {ino}: no such file or directory in the store")
    return node


def put(store: Store, txn: lmdb.Transaction, node: Inode, new: bool = False) -> None:
    store.put(txn, "inodes", u64key(node.ino), node.pack(), overwrite=not new)


def lookup(store: Store, txn: lmdb.Transaction, parent: int, name: bytes) -> int | None:
    """The inode number of name in directory parent, or None."""
    raw = store.get(txn, "dirents", u64key(parent) + name)
    if raw is None:
        return None
    if len(raw) != 8:
        raise DamagedRecord(f"directory entry {names.show(name)!r} is malformed")
    return key_u64(raw)


def entries(store: Store, txn: lmdb.Transaction, parent: int,
            on_damage: Callable[[bytes, Exception], None] | None = None) -> Iterator[tuple[bytes, int]]:
    """(name, inode number) of each entry of directory parent, sorted by name."""
    prefix = u64key(parent)
    for k, v in store.scan(txn, "dirents", prefix, on_damage=on_damage):
        if len(v) != 8 or not 0 < len(k) - 8 <= names.MAX_COMPONENT:
            err = DamagedRecord(f"directory entry {names.show(k[8:])!r} is malformed")
            if on_damage is None:
                raise err
            on_damage(k, err)
            continue
        yield k[8:], key_u64(v)


def names_of(store: Store, txn: lmdb.Transaction, wanted: set[int]) -> list[tuple[int, tuple[int, bytes]]]:
    """(ino, (parent, name)) of every entry naming one of wanted: a scan of all directory entries,
    for the rare cases that need every hard link of a file (an inode records only its last name)."""
    if not wanted:
        return []
    entries = store.scan(txn, "dirents", on_damage=lambda k, e: None)
    return [(key_u64(v), (key_u64(k[:8]), k[8:])) for k, v in entries if len(v) == 8 and key_u64(v) in wanted]


def is_empty(store: Store, txn: lmdb.Transaction, ino: int) -> bool:
    return next(iter(store.scan(txn, "dirents", u64key(ino))), None) is None


def resolve(store: Store, txn: lmdb.Transaction, path: str) -> Inode:
    """The inode at a store path ('' is the root); NotFoundError when there is none."""
    node = get(store, txn, ROOT)
    for i, part in enumerate(parts := names.split(path)):
        if not node.is_dir:
            raise NotFoundError(f"{names.normalize(path)}: {'/'.join(names.show(p) for p in parts[:i])} "
                                "is not a directory")
        child = lookup(store, txn, node.ino, part)
        if child is None:
            raise NotFoundError(f"{names.normalize(path)}: no such file or directory in the store")
        node = get(store, txn, child)
    return node


def path_of(store: Store, txn: lmdb.Transaction, node: Inode) -> str:
    """The path of an inode by its parent pointers (a file's last name); NotFoundError when one
    of its directories is gone."""
    parts: list[bytes] = []
    seen = set()  # directories nest as deep as mkdir at a time allows: only a loop is damage
    while node.ino != ROOT:
        if node.ino in seen:
            raise DamagedRecord(f"inode {node.ino}: its parent directories form a loop")
        seen.add(node.ino)
        parts.append(node.name)
        parent = find(store, txn, node.parent)
        if parent is None:
            raise NotFoundError(f"inode {node.ino}: its directory is gone")
        node = parent
    return "/".join(names.show(p) for p in reversed(parts))


def shows_staged(store: Store, txn: lmdb.Transaction, ino: int, sid: int) -> bool:
    """Whether inode ino exists and shows staged version sid."""
    node = find(store, txn, ino)
    return node is not None and (node.content, node.content_id) == (STAGED, sid)


def describe(store: Store, txn: lmdb.Transaction, ino: int) -> str:
    """A path for messages: the inode's path, or 'inode N' when it has none any more."""
    try:
        node = find(store, txn, ino)
        return path_of(store, txn, node) if node is not None else f"inode {ino}"
    except (NotFoundError, DamagedRecord):
        return f"inode {ino}"


def _children(store: Store, txn: lmdb.Transaction, base: str, ino: int,
              on_damage: OnDamage | None) -> Iterator[tuple[str, int, bytes, Inode]]:
    report = None if on_damage is None else lambda k, e: on_damage(names.join(base, k[8:]), e)
    for name, child in entries(store, txn, ino, on_damage=report):
        p = names.join(base, name)
        try:
            node = get(store, txn, child)
        except (DamagedRecord, NotFoundError) as e:
            if on_damage is None:
                raise
            on_damage(p, e)
            continue
        yield p, ino, name, node


def walk_entries(store: Store, txn: lmdb.Transaction, path: str = "",
                 on_damage: OnDamage | None = None) -> Iterator[tuple[str, int, bytes, Inode]]:
    """(path, parent ino, name, inode) of everything under path, depth first, names in byte
    order. Damaged entries raise, or with on_damage are reported and skipped."""
    top = resolve(store, txn, path)
    if not top.is_dir:
        return
    stack = [_children(store, txn, names.normalize(path), top.ino, on_damage)]
    seen = {top.ino}  # a directory has one name: met twice, the entries form a loop
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        yield item
        if item[3].is_dir:
            if item[3].ino in seen:
                raise DamagedRecord(f"{item[0]}: a directory entry leads back to a directory above it")
            seen.add(item[3].ino)
            stack.append(_children(store, txn, item[0], item[3].ino, on_damage))


def walk(store: Store, txn: lmdb.Transaction, path: str = "",
         on_damage: OnDamage | None = None) -> Iterator[tuple[str, Inode]]:
    """(path, inode) of path itself (unless it is the root) and of everything under it."""
    top = resolve(store, txn, path)
    if top.ino != ROOT:
        yield names.normalize(path), top
    for p, _, _, node in walk_entries(store, txn, path, on_damage):
        yield p, node


# ---- changing ----

def make_root(store: Store, txn: lmdb.Transaction, uid: int, gid: int, now: int) -> None:
    put(store, txn, Inode(ROOT, stat.S_IFDIR | 0o755, uid, gid, 2, 0, now, now, now), new=True)
    store.put(txn, "meta", NEXT_INO, b"2")


def _dir(store: Store, txn: lmdb.Transaction, ino: int) -> Inode:
    node = find(store, txn, ino)
    if node is None:
        raise NamespaceError(errno.ENOENT, f"directory inode {ino} is gone")
    if not node.is_dir:
        raise NamespaceError(errno.ENOTDIR, f"inode {ino} is not a directory")
    return node


def _touch(store: Store, txn: lmdb.Transaction, d: Inode, now: int, nlink: int = 0) -> None:
    d.mtime_ns = d.ctime_ns = now
    d.nlink += nlink
    put(store, txn, d)


def create(store: Store, txn: lmdb.Transaction, parent: int, name: bytes, mode: int, uid: int, gid: int,
           now: int, rdev: int = 0, target: bytes = b"") -> Inode:
    """A new inode named name in directory parent (EEXIST when the name is taken).

    In a set-group-ID directory the new inode takes the directory's group, and a new directory
    the set-group-ID bit too, as on Linux filesystems.
    """
    names.check_component(name)
    d = _dir(store, txn, parent)
    if lookup(store, txn, parent, name) is not None:
        raise NamespaceError(errno.EEXIST, f"{names.show(name)}: already exists")
    if d.mode & stat.S_ISGID:
        gid = d.gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    node = Inode(store.next_id(txn, NEXT_INO), mode, uid, gid, 2 if stat.S_ISDIR(mode) else 1, rdev,
                 now, now, now, len(target), parent=parent, name=name, target=target)
    put(store, txn, node, new=True)
    store.put(txn, "dirents", u64key(parent) + name, u64key(node.ino))
    _touch(store, txn, d, now, 1 if node.is_dir else 0)
    return node


def link(store: Store, txn: lmdb.Transaction, ino: int, parent: int, name: bytes, now: int) -> Inode:
    """A second name for a file (EPERM for directories)."""
    names.check_component(name)
    node = get(store, txn, ino)
    if node.is_dir:
        raise NamespaceError(errno.EPERM, "hard links to directories are not allowed")
    d = _dir(store, txn, parent)
    if lookup(store, txn, parent, name) is not None:
        raise NamespaceError(errno.EEXIST, f"{names.show(name)}: already exists")
    store.put(txn, "dirents", u64key(parent) + name, u64key(ino))
    node.nlink += 1
    node.ctime_ns = now
    node.parent, node.name = parent, name
    put(store, txn, node)
    _touch(store, txn, d, now)
    return node


def _child(store: Store, txn: lmdb.Transaction, parent: int, name: bytes) -> Inode:
    names.check_component(name)
    ino = lookup(store, txn, parent, name)
    if ino is None:
        raise NamespaceError(errno.ENOENT, f"{names.show(name)}: no such file or directory")
    return get(store, txn, ino)


def release_content(store: Store, txn: lmdb.Transaction, node: Inode, rel: Released) -> None:
    """Let go of an inode's content: a stored version becomes an orphan of this inode (gc frees
    it once no reader pins the inode), a staged one a tombstone."""
    if node.content == STORED:
        store.put(txn, "orphans", u64key(node.content_id), u64key(node.ino))
    elif node.content == STAGED:
        journal.tombstone(store, txn, node.content_id, rel.dead)
    node.content, node.content_id = NONE, 0


def set_content(store: Store, txn: lmdb.Transaction, node: Inode, kind: int, content_id: int, size: int,
                rel: Released) -> None:
    """Point an inode at new content, releasing what it had (unless it is the same)."""
    if (node.content, node.content_id) != (kind, content_id):
        release_content(store, txn, node, rel)
    node.content, node.content_id, node.size = kind, content_id, size
    put(store, txn, node)


def _delete(store: Store, txn: lmdb.Transaction, node: Inode, rel: Released) -> None:
    """An inode's last name is gone: remove it, its xattrs and model record; release its content."""
    release_content(store, txn, node, rel)
    journal.tombstone_inode(store, txn, node.ino, rel.dead)
    store.delete(txn, "inodes", u64key(node.ino))
    if store.delete(txn, "models", u64key(node.ino)):
        _forget_base(store, txn, node.ino)
    for k, _ in list(store.scan(txn, "xattrs", u64key(node.ino))):
        store.delete(txn, "xattrs", k)
    rel.removed.append(node.ino)


def _forget_base(store: Store, txn: lmdb.Transaction, ino: int) -> None:
    """A removed model was the base of others: their later files choose a base anew (the deltas
    they have keep their base chunks, which they hold references on)."""
    from zipfs.store import models  # models names inodes; inodes only clears their base links

    for k, v in list(store.scan(txn, "models")):
        m = models.Model.unpack(key_u64(k), v)
        if m.base == ino:
            m.base, m.reason = 0, "its base was removed"
            models.put(store, txn, m)


def _drop_name(store: Store, txn: lmdb.Transaction, d: Inode, name: bytes, node: Inode, now: int,
               rel: Released) -> None:
    """Remove entry name (of node) from directory d."""
    store.delete(txn, "dirents", u64key(d.ino) + name)
    if node.is_dir:
        _delete(store, txn, node, rel)
        _touch(store, txn, d, now, -1)
        return
    _touch(store, txn, d, now)
    node.nlink -= 1
    if node.nlink == 0:
        _delete(store, txn, node, rel)
        return
    node.ctime_ns = now
    if (node.parent, node.name) == (d.ino, name):  # its recorded name went: record another one
        node.parent, node.name = next((where for _, where in names_of(store, txn, {node.ino})),
                                      (node.parent, node.name))
    put(store, txn, node)


def unlink(store: Store, txn: lmdb.Transaction, parent: int, name: bytes, now: int, rel: Released) -> Inode:
    d = _dir(store, txn, parent)
    node = _child(store, txn, parent, name)
    if node.is_dir:
        raise NamespaceError(errno.EISDIR, f"{names.show(name)}: is a directory")
    _drop_name(store, txn, d, name, node, now, rel)
    return node


def rmdir(store: Store, txn: lmdb.Transaction, parent: int, name: bytes, now: int, rel: Released) -> Inode:
    d = _dir(store, txn, parent)
    node = _child(store, txn, parent, name)
    if not node.is_dir:
        raise NamespaceError(errno.ENOTDIR, f"{names.show(name)}: not a directory")
    if not is_empty(store, txn, node.ino):
        raise NamespaceError(errno.ENOTEMPTY, f"{names.show(name)}: directory not empty")
    _drop_name(store, txn, d, name, node, now, rel)
    return node


def _is_within(store: Store, txn: lmdb.Transaction, ino: int, ancestor: int) -> bool:
    """Whether directory ino is ancestor or lies under it."""
    seen = set()
    while ino not in seen:
        if ino == ancestor:
            return True
        if ino == ROOT:
            return False
        seen.add(ino)
        ino = get(store, txn, ino).parent
    raise DamagedRecord("directory parents form a loop")


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def rename(store: Store, txn: lmdb.Transaction, old_parent: int, old_name: bytes, new_parent: int,
           new_name: bytes, flags: int, now: int, rel: Released) -> None:
    """POSIX rename (and Linux's RENAME_NOREPLACE / RENAME_EXCHANGE): one entry moves, what the
    new name held goes away (or, exchanging, takes the old name)."""
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
        raise NamespaceError(errno.EINVAL, f"rename flags {flags:#x} are not supported")  # WHITEOUT
    od, nd = _dir(store, txn, old_parent), _dir(store, txn, new_parent)
    src = _child(store, txn, old_parent, old_name)
    names.check_component(new_name)
    dst_ino = lookup(store, txn, new_parent, new_name)
    dst = get(store, txn, dst_ino) if dst_ino is not None else None
    if flags & RENAME_EXCHANGE:
        if dst is None:
            raise NamespaceError(errno.ENOENT, f"{names.show(new_name)}: no such file or directory")
    elif dst is not None and flags & RENAME_NOREPLACE:
        raise NamespaceError(errno.EEXIST, f"{names.show(new_name)}: already exists")
    if (old_parent, old_name) == (new_parent, new_name) or (dst is not None and dst.ino == src.ino):
        return  # the same file under both names: POSIX says do nothing
    if src.is_dir and _is_within(store, txn, new_parent, src.ino):
        raise NamespaceError(errno.EINVAL, "cannot move a directory into itself")
    if flags & RENAME_EXCHANGE:
        if dst.is_dir and _is_within(store, txn, old_parent, dst.ino):
            raise NamespaceError(errno.EINVAL, "cannot move a directory into itself")
        _exchange(store, txn, od, old_name, src, nd, new_name, dst, now)
        return
    if dst is not None:
        if src.is_dir and not dst.is_dir:
            raise NamespaceError(errno.ENOTDIR, f"{names.show(new_name)}: not a directory")
        if dst.is_dir and not src.is_dir:
            raise NamespaceError(errno.EISDIR, f"{names.show(new_name)}: is a directory")
        if dst.is_dir and not is_empty(store, txn, dst.ino):
            raise NamespaceError(errno.ENOTEMPTY, f"{names.show(new_name)}: directory not empty")
        _drop_name(store, txn, nd, new_name, dst, now, rel)
        nd = _dir(store, txn, new_parent)  # its record changed
        if od.ino == nd.ino:
            od = nd
    store.delete(txn, "dirents", u64key(old_parent) + old_name)
    store.put(txn, "dirents", u64key(new_parent) + new_name, u64key(src.ino))
    moved_dir = src.is_dir and old_parent != new_parent
    _touch(store, txn, od, now, -1 if moved_dir else 0)
    if nd.ino != od.ino:
        _touch(store, txn, nd, now, 1 if moved_dir else 0)
    src.parent, src.name, src.ctime_ns = new_parent, new_name, now
    put(store, txn, src)


def _exchange(store: Store, txn: lmdb.Transaction, od: Inode, old_name: bytes, src: Inode, nd: Inode,
              new_name: bytes, dst: Inode, now: int) -> None:
    store.put(txn, "dirents", u64key(od.ino) + old_name, u64key(dst.ino))
    store.put(txn, "dirents", u64key(nd.ino) + new_name, u64key(src.ino))
    if od.ino != nd.ino and src.is_dir != dst.is_dir:  # a directory changes parent: link counts move
        shift = 1 if src.is_dir else -1
        _touch(store, txn, od, now, -shift)
        _touch(store, txn, nd, now, shift)
    else:
        _touch(store, txn, od, now)
        if nd.ino != od.ino:
            _touch(store, txn, nd, now)
    src.parent, src.name, src.ctime_ns = nd.ino, new_name, now
    dst.parent, dst.name, dst.ctime_ns = od.ino, old_name, now
    put(store, txn, src)
    put(store, txn, dst)


def remove_tree(store: Store, txn: lmdb.Transaction, path: str, now: int, rel: Released) -> tuple[int, int]:
    """Remove a name and, for a directory, everything under it (zipfs rm); (files, directories)."""
    parts = names.split(path)
    if not parts:
        raise NamespaceError(errno.EBUSY, "refusing to remove the whole store; name what to remove")
    top = resolve(store, txn, path)
    parent = resolve(store, txn, "/".join(names.show(p) for p in parts[:-1]))
    doomed = [(parent.ino, parts[-1], top)]
    doomed += [(d, n, node) for _, d, n, node in walk_entries(store, txn, path)]
    files = dirs = 0
    for d, name, node in reversed(doomed):  # children before their directory
        if not node.is_dir:
            node = get(store, txn, node.ino)  # another of its names may have gone just before
        _drop_name(store, txn, _dir(store, txn, d), name, node, now, rel)
        dirs += node.is_dir
        files += not node.is_dir
    return files, dirs


def make_dirs(store: Store, txn: lmdb.Transaction, parts: list[bytes], uid: int, gid: int, now: int,
              mode: int = 0o755) -> Inode:
    """The directory at parts, created with its missing parents (mode, owner as given)."""
    node = get(store, txn, ROOT)
    for part in parts:
        child = lookup(store, txn, node.ino, part)
        if child is None:
            node = create(store, txn, node.ino, part, stat.S_IFDIR | mode, uid, gid, now)
            continue
        node = get(store, txn, child)
        if not node.is_dir:
            raise NamespaceError(errno.ENOTDIR, f"{names.show(part)} is not a directory")
    return node


def replace(store: Store, txn: lmdb.Transaction, path: str, mode: int, uid: int, gid: int, now: int,
            rel: Released, target: bytes = b"") -> Inode:
    """A new inode at path (its directories created), replacing a file or link there as rename
    does: the old inode loses that name (its content stays for whoever still reads it)."""
    parts = names.split(path)
    if not parts:
        raise NamespaceError(errno.EISDIR, "cannot store a file at the store root; give it a name")
    d = make_dirs(store, txn, parts[:-1], uid, gid, now)
    old = lookup(store, txn, d.ino, parts[-1])
    if old is not None:
        if get(store, txn, old).is_dir:
            raise NamespaceError(errno.EISDIR, f"{names.normalize(path)}: is a directory in the store")
        unlink(store, txn, d.ino, parts[-1], now, rel)
    return create(store, txn, d.ino, parts[-1], mode, uid, gid, now, target=target)
