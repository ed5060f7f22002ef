"""Binary records kept in LMDB. Pure pack/unpack functions, no I/O.

Small per-chunk records live apart from payloads: LMDB rewrites a whole value on update, and
refcount changes must not rewrite megabytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from zipfs.errors import StoreError

#: chunk kinds, for stats
STANDALONE, CONST, DELTA_XOR, DELTA_SUB = 0, 1, 2, 3
KIND_NAMES = {STANDALONE: "standalone", CONST: "const", DELTA_XOR: "delta-xor", DELTA_SUB: "delta-sub"}

_CHUNK = struct.Struct("<QQIIQBIB32s")


def u64key(n: int) -> bytes:
    """Big-endian keys keep integer ids in order (LMDB appends cheaply)."""
    return n.to_bytes(8, "big")


def key_u64(k: bytes) -> int:
    return int.from_bytes(k, "big")


@dataclass
class ChunkRecord:
    """Metadata of one stored chunk. `refs` counts file extents plus delta chunks using it as base."""

    checksum: int
    base: int  # chunk id of the base for deltas, 0 when standalone
    raw_len: int
    stored_len: int
    refs: int
    kind: int
    #: for deltas: byte offset of the base bytes inside the base chunk, and the widening applied
    #: to them (zipfs.codec.widen); 0 and 0 when the base chunk covers the same elements as-is
    base_off: int
    base_xform: int
    hash: bytes  # blake3-256 of the raw bytes: the chunk's content address

    def pack(self) -> bytes:
        return _CHUNK.pack(self.checksum, self.base, self.raw_len, self.stored_len, self.refs,
                           self.kind, self.base_off, self.base_xform, self.hash)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> ChunkRecord:
        try:
            return cls(*_CHUNK.unpack(bytes(data)))
        except struct.error:
            raise StoreError(f"chunk record of {len(data)} bytes is malformed") from None


@dataclass
class TensorEntry:
    """Where one tensor sits in a file (for ls, base matching and tensor-aware prefetch)."""

    name: str
    dtype: str
    shape: list[int]
    start: int
    end: int
    #: blake3 over the tensor's chunk hashes: equal tensors have equal digests
    digest: str


@dataclass
class FileRecord:
    """One stored file: size, sha256, and extents covering [0, size) in order."""

    size: int
    sha256: str
    kind: str  # "safetensors" or "opaque"
    mtime_ns: int
    #: offsets[i] is where extent i starts; chunk_ids[i] is its chunk (whole chunk, in order)
    offsets: np.ndarray
    chunk_ids: np.ndarray
    tensors: list[TensorEntry] = field(default_factory=list)
    #: why a .safetensors file was stored as opaque bytes
    note: str = ""
    #: payload bytes this file added to the store when it was ingested (its marginal cost)
    new_bytes: int = 0
    #: how many of its chunks were already in the store
    reused_chunks: int = 0
    model: str = ""

    def pack(self) -> bytes:
        head = {
            "size": self.size, "sha256": self.sha256, "kind": self.kind,
            "mtime_ns": self.mtime_ns, "n": len(self.chunk_ids), "note": self.note,
            "new_bytes": self.new_bytes, "reused_chunks": self.reused_chunks, "model": self.model,
            "tensors": [[t.name, t.dtype, t.shape, t.start, t.end, t.digest] for t in self.tensors],
        }
        js = json.dumps(head, separators=(",", ":")).encode()
        return b"".join([struct.pack("<I", len(js)), js,
                         self.offsets.astype("<u8").tobytes(), self.chunk_ids.astype("<u8").tobytes()])

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> FileRecord:
        try:
            (n,) = struct.unpack_from("<I", data, 0)
            head = json.loads(bytes(data[4:4 + n]))
            count = head["n"]
            arrays = np.frombuffer(data, dtype="<u8", count=2 * count, offset=4 + n)
        except (struct.error, ValueError, KeyError, json.JSONDecodeError):
            raise StoreError("file record is malformed") from None
        return cls(
            size=head["size"], sha256=head["sha256"], kind=head["kind"], mtime_ns=head["mtime_ns"],
            offsets=arrays[:count].astype(np.uint64), chunk_ids=arrays[count:].astype(np.uint64),
            tensors=[TensorEntry(*t) for t in head["tensors"]], note=head["note"],
            new_bytes=head["new_bytes"], reused_chunks=head["reused_chunks"], model=head["model"],
        )


#: namespace entries: a directory, a stored file (its file id), a staged file written through the
#: mount and not yet ingested (its staging id), or a symbolic link (its target)
DIR = b"D"
FILE = b"F"
STAGED = b"S"
LINK = b"L"


@dataclass(frozen=True)
class NsEntry:
    """One namespace value, decoded."""

    kind: bytes
    id: int = 0  # file id (FILE) or staging id (STAGED)
    target: bytes = b""  # LINK

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def file_id(self) -> int | None:
        """The stored file's id, or None for anything else."""
        return self.id if self.kind == FILE else None

    def pack(self) -> bytes:
        if self.kind == DIR:
            return DIR
        if self.kind == LINK:
            return LINK + self.target
        return self.kind + u64key(self.id)


def ns_dir() -> bytes:
    return DIR


def ns_file(file_id: int) -> bytes:
    return FILE + u64key(file_id)


def ns_unpack(entry: bytes | memoryview) -> NsEntry:
    """Decode a namespace value; StoreError when it is none of the known kinds."""
    entry = bytes(entry)
    kind = entry[:1]
    if kind in (FILE, STAGED) and len(entry) == 9:
        return NsEntry(kind, key_u64(entry[1:]))
    if entry == DIR:
        return NsEntry(DIR)
    if kind == LINK and len(entry) > 1:
        return NsEntry(LINK, target=entry[1:])
    raise StoreError("namespace entry is malformed")


def ns_file_id(entry: bytes | memoryview) -> int | None:
    """The file id of a namespace entry for a stored file, or None for anything else."""
    return ns_unpack(entry).file_id
