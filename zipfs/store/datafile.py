"""Check an LMDB data file against its own meta pages before mapping it.

LMDB maps data.mdb and trusts it: a file shorter than its meta pages say makes the first touch
of a missing page a SIGBUS that kills the process. Reading the two meta pages with plain reads
first turns a truncated or foreign file into a one-line error. Layout (LMDB 0.9, 64-bit): each
meta page holds a 16-byte page header, then magic, version, the page size (in the free DB's pad
field), the last page number and the transaction id; LMDB uses the valid meta with the higher id.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

from zipfs.errors import StoreError

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_META = 0x08
_FLAGS, _MAGIC, _VERSION, _PSIZE, _LAST, _TXNID = 10, 16, 20, 40, 136, 144
#: md_root of the free DB (at 16 + 24 + 40) and of the main DB (one 48-byte MDB_db later)
_ROOTS = (80, 128)
P_INVALID = (1 << 64) - 1


def _meta(page: bytes) -> tuple[int, int, int] | None:
    """(page size, last page number, txn id) of a meta page, or None when it is not one (a
    database root past the last page means the page is damaged, not another version)."""
    if len(page) < _TXNID + 8:
        return None
    (flags,) = struct.unpack_from("<H", page, _FLAGS)
    magic, version, psize = (struct.unpack_from("<I", page, o)[0] for o in (_MAGIC, _VERSION, _PSIZE))
    if magic != MAGIC or version != DATA_VERSION or not flags & P_META:
        return None
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    last, txnid = struct.unpack_from("<QQ", page, _LAST)
    roots = [struct.unpack_from("<Q", page, at)[0] for at in _ROOTS]
    if any(root != P_INVALID and root > last for root in roots):
        return None
    return psize, last, txnid


def check(path: Path, attempts: int = 5) -> None:
    """StoreError when data.mdb at path is not a complete LMDB file; nothing when it is.

    The meta pages are read as they are, while another process may commit (rewriting one of
    them and growing the file): what looks damaged is read again a few times, since only
    damage stays."""
    for attempt in range(attempts):
        try:
            return _check_once(path)
        except StoreError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.02 * (attempt + 1))


def _check_once(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            first = f.read(4096)
            m0 = _meta(first)
            psize = m0[0] if m0 else 4096
            f.seek(psize)
            m1 = _meta(f.read(4096))
            size = os.fstat(f.fileno()).st_size  # after the metas: a commit only grows the file
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from None
    if m0 is None or m1 is None:
        raise StoreError(f"{path}: {'both' if m0 is m1 else 'a'} meta page{'s are' if m0 is m1 else ' is'} "
                         "damaged or not LMDB's; restore the store from a copy")
    # every commit writes the older of the two: they hold the last two transactions, N-1 and N
    # (a fresh file: 0 and 0 or 1); anything else means one was damaged, and LMDB would open
    # an older snapshot without a word
    if abs(m0[2] - m1[2]) != 1 and max(m0[2], m1[2]) > 0:
        raise StoreError(f"{path}: its meta pages disagree (transactions {m0[2]} and {m1[2]}); one is "
                         "damaged: restore the store from a copy")
    newest = 0 if m0[2] >= m1[2] else 1
    psize, last_pg, _ = (m0, m1)[newest]
    need = (last_pg + 1) * psize
    if size < need and not _tail_is_free(path, psize, newest, last_pg, size):
        raise StoreError(f"{path} is shorter ({size} bytes) than its meta page says ({need}): truncated, or "
                         "the meta page is damaged; restore the store from a copy")


def _tail_is_free(path: Path, psize: int, meta_pg: int, last_pg: int, size: int) -> bool:
    """Whether every page between the end of the file and the last page is in the free list.

    LMDB never writes a page it allocated and freed again in one transaction (a "loose" page):
    it goes to the free list unwritten, so a commit that freed pages it had just allocated at
    the end leaves the file shorter than its meta page says, and that file is whole. A file cut
    short is not: its missing tail holds pages in use."""
    if size < 2 * psize:
        return False
    try:
        return _free_tail(path, psize, meta_pg, last_pg, size)
    except (OSError, ValueError):
        return False


def _free_tail(path: Path, psize: int, meta_pg: int, last_pg: int, size: int) -> bool:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            free_db = _DB.unpack_from(buf, meta_pg * psize + _FREE_DB)
            tree = _Tree(path, buf, psize, size // psize - 1, leaves=True)  # the list lies in the file
            pages: set[int] = set()

            def leaf(at: int, nbytes: int, flags: int, ksize: int) -> None:
                value = at + _NODE + ksize
                if flags & F_BIGDATA:
                    value = struct.unpack_from("<Q", buf, value)[0] * psize + _HEADER
                (n,) = struct.unpack_from("<Q", buf, value)
                if 8 * (n + 1) > nbytes:
                    raise StoreError("a free list entry is longer than its record")
                pages.update(struct.unpack_from(f"<{n}Q", buf, value + 8))

            tree.walk("free", free_db[7], free_db[2], leaf)
            return all(pg in pages for pg in range(size // psize, last_pg + 1))
        except (StoreError, struct.error, IndexError):
            return False
        finally:
            buf.release()


P_BRANCH, P_LEAF, P_OVERFLOW = 0x01, 0x02, 0x04
F_BIGDATA, F_SUBDATA = 0x01, 0x02
_HEADER = 16  # page header: page number, pad, flags, lower and upper bounds (overflow: page count)
_NODE = 8  # node header: data size (leaf) or child page (branch, with the flags), flags, key size
#: MDB_db: pad, flags, depth, branch/leaf/overflow page counts, entries, root page
_DB = struct.Struct("<IHHQQQQQ")
_FREE_DB, _MAIN_DB = 40, 88  # offsets of the free and main DB's MDB_db in a meta page
MAX_DEPTH = 32


class _Tree:
    """The B-trees of one data file, walked as LMDB's cursors would walk them."""

    def __init__(self, path: Path, buf: memoryview, psize: int, last_pg: int, leaves: bool) -> None:
        self.path, self.buf, self.psize, self.last_pg, self.leaves = path, buf, psize, last_pg, leaves
        self.seen: set[int] = set()

    def damaged(self, table: str, pg: int, why: str) -> StoreError:
        return StoreError(f"{self.path}: page {pg} of the {table} table is damaged ({why}); restore the "
                          "store from a copy")

    def page(self, table: str, pg: int, kind: int) -> tuple[int, int]:
        """(flags, number of nodes) of page pg, which must be a page of that kind, seen once."""
        if not 2 <= pg <= self.last_pg:
            raise self.damaged(table, pg, f"a link to page {pg}, past the last page {self.last_pg}")
        if pg in self.seen:
            raise self.damaged(table, pg, "linked twice")
        self.seen.add(pg)
        base = pg * self.psize
        pgno, _, flags, lower, upper = struct.unpack_from("<QHHHH", self.buf, base)
        if pgno != pg or not flags & kind or flags & (P_BRANCH | P_LEAF | P_OVERFLOW) & ~kind:
            raise self.damaged(table, pg, "its header is not that of the page linked to")
        if kind == P_OVERFLOW:
            return flags, 0
        if not _HEADER <= lower <= upper <= self.psize or (lower - _HEADER) % 2:
            raise self.damaged(table, pg, "its bounds are out of the page")
        return flags, (lower - _HEADER) // 2

    def nodes(self, table: str, pg: int, n: int) -> list[tuple[int, int, int, int]]:
        """(offset, data size or child, flags, key size) of each node of page pg, within it."""
        base, out = pg * self.psize, []
        upper = struct.unpack_from("<H", self.buf, base + 14)[0]
        for i in range(n):
            off = struct.unpack_from("<H", self.buf, base + _HEADER + 2 * i)[0]
            if not upper <= off <= self.psize - _NODE:
                raise self.damaged(table, pg, f"node {i} lies outside the page")
            lo, hi, flags, ksize = struct.unpack_from("<HHHH", self.buf, base + off)
            if off + _NODE + ksize > self.psize:
                raise self.damaged(table, pg, f"the key of node {i} runs past the page")
            out.append((base + off, lo | hi << 16, flags, ksize))
        return out

    def walk(self, table: str, root: int, depth: int, on_leaf_node=None) -> None:
        """Every page of the tree at root: branches above, leaves at depth, each node within its
        page, each large value's overflow run within the file; on_leaf_node(at, size, flags, ksize)
        for every leaf node (the main DB's hold the tables)."""
        if root == P_INVALID:
            return
        if not 1 <= depth <= MAX_DEPTH:
            raise self.damaged(table, root, f"a tree depth of {depth}")
        stack = [(root, 1)]
        while stack:
            pg, level = stack.pop()
            if level < depth:
                _, n = self.page(table, pg, P_BRANCH)
                if n < 2 and table != "free":  # LMDB asserts this of every branch page it searches
                    raise self.damaged(table, pg, f"a branch page with {n} keys")
                for _, size, flags, _ in self.nodes(table, pg, n):
                    stack.append((size | flags << 32, level + 1))
                continue
            _, n = self.page(table, pg, P_LEAF)
            if not self.leaves and on_leaf_node is None:
                continue
            for at, size, flags, ksize in self.nodes(table, pg, n):
                value = at + _NODE + ksize
                if flags & F_BIGDATA:
                    self.overflow(table, struct.unpack_from("<Q", self.buf, value)[0], size)
                elif value + size > (pg + 1) * self.psize:
                    raise self.damaged(table, pg, "a value runs past the page")
                if on_leaf_node is not None:
                    on_leaf_node(at, size, flags, ksize)

    def overflow(self, table: str, pg: int, size: int) -> None:
        self.page(table, pg, P_OVERFLOW)
        (count,) = struct.unpack_from("<I", self.buf, pg * self.psize + 12)
        if pg + count - 1 > self.last_pg or count * self.psize - _HEADER < size:
            raise self.damaged(table, pg, f"an overflow run of {count} pages for {size} bytes")


def check_tree(path: Path, txn_id: int, leaves: bool = True) -> bool:
    """StoreError when a B-tree of data.mdb's snapshot txn_id is not well formed, before LMDB
    walks it: LMDB trusts its pages and aborts the process (an assertion) or reads out of bounds
    on a damaged link, bound or count. Every branch page and the header of every page it links
    to are checked; with leaves, every leaf node and overflow run too (all the metadata).

    The caller holds a read transaction of txn_id, so none of its pages is reused meanwhile;
    False when neither meta page is that snapshot any more (two commits since): take a newer one.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _check_snapshot(path, buf, txn_id, leaves)
        finally:
            buf.release()


def _check_snapshot(path: Path, buf: memoryview, txn_id: int, leaves: bool) -> bool:
    psize = struct.unpack_from("<I", buf, _PSIZE)[0]
    for pg in (0, 1):
        m = _meta(bytes(buf[pg * psize:pg * psize + 4096]))
        if m is not None and m[2] == txn_id:
            break
    else:
        return False
    psize, last_pg, _ = m
    if (last_pg + 1) * psize > len(buf):
        if not _tail_is_free(path, psize, pg, last_pg, len(buf)):
            return False  # grown since it was mapped
        # free pages LMDB never wrote: no tree may link them, the values' overflow runs included
        last_pg, leaves = len(buf) // psize - 1, True
    meta = pg * psize
    tree = _Tree(path, buf, psize, last_pg, leaves)
    free, main = (_DB.unpack_from(buf, meta + at) for at in (_FREE_DB, _MAIN_DB))
    tree.walk("free", free[7], free[2])

    def table(at: int, size: int, flags: int, ksize: int) -> None:
        name = bytes(buf[at + _NODE:at + _NODE + ksize]).decode(errors="replace")
        if flags != F_SUBDATA or size != _DB.size:
            raise tree.damaged("main", at // psize, f"the record of table {name!r} is not a table's")
        db = _DB.unpack_from(buf, at + _NODE + ksize)
        tree.walk(name, db[7], db[2])

    tree.walk("main", main[7], main[2], table)
    return True
