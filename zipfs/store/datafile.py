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


def _meta(page: bytes) -> tuple[int, int, int] | None:
    """(page size, last page number, txn id) of a meta page, or None when it is not one."""
    if len(page) < _TXNID + 8:
        return None
    (flags,) = struct.unpack_from("<H", page, _FLAGS)
    magic, version, psize = (struct.unpack_from("<I", page, o)[0] for o in (_MAGIC, _VERSION, _PSIZE))
    if magic != MAGIC or version != DATA_VERSION or not flags & P_META:
        return None
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    return psize, *struct.unpack_from("<QQ", page, _LAST)


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
    metas = [m for m in (m0, m1) if m is not None]
    if not metas:
        raise StoreError(f"{path} is not an LMDB data file, or both its meta pages are damaged")
    psize, last_pg, _ = max(metas, key=lambda m: m[2])
    need = (last_pg + 1) * psize
    if size < need:
        raise StoreError(f"{path} is truncated: {size} bytes, its meta page says {need}; "
                         "restore it from a copy (the store cannot be opened safely)")
