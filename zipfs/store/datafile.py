"""Check an LMDB data file against its own meta pages before mapping it.

LMDB maps data.mdb and trusts it: a file shorter than its meta pages say makes the first touch
of a missing page a SIGBUS that kills the process. Reading the two meta pages with plain reads
first turns a truncated or foreign file into a one-line error. Layout (LMDB 0.9, 64-bit): each
meta page holds a 16-byte page header, then magic, version, the page size (in the free DB's pad
field), the last page number and the transaction id; LMDB uses the valid meta with the higher id.
"""

from __future__ import annotations

import os
import struct
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


def check(path: Path) -> None:
    """StoreError when data.mdb at path is not a complete LMDB file; nothing when it is."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(4096)
            m0 = _meta(first)
            psize = m0[0] if m0 else 4096
            f.seek(psize)
            m1 = _meta(f.read(4096))
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
    psize, last_pg, _ = max((m0, m1), key=lambda m: m[2])
    need = (last_pg + 1) * psize
    if size < need:
        raise StoreError(f"{path} is shorter ({size} bytes) than its meta page says ({need}): truncated, or "
                         "the meta page is damaged; restore the store from a copy")
