"""Binary records kept in LMDB. Pure pack/unpack/seal functions, no I/O.

Every record but a chunk payload is sealed: its value carries an xxh3-64 over the table name,
the key and the value, checked on every read, so a flipped byte (in the value, in the key, or
in a B-tree page that sends a lookup to another table's leaf) is an error, never another record.
Payloads are covered by their chunk record's checksum of the decoded bytes instead (a payload
read under the wrong key decodes to bytes whose checksum does not match).

Small per-chunk records live apart from payloads: LMDB rewrites a whole value on update, and
refcount changes must not rewrite megabytes. Unpacking also checks structure (a file's extents
cover exactly [0, size), a chunk's kind and widening are known), so a record that passes its
seal but is nonsense anyway is still refused.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash

from zipfs.codec import widen
from zipfs.errors import StoreError

#: chunk kinds, for stats
#: VERBATIM: the payload is the chunk's bytes; FRAME: one zstd frame of them (no codec header)
STANDALONE, CONST, DELTA_XOR, DELTA_SUB, VERBATIM, FRAME = 0, 1, 2, 3, 4, 5
KIND_NAMES = {STANDALONE: "standalone", CONST: "const", DELTA_XOR: "delta-xor", DELTA_SUB: "delta-sub",
              VERBATIM: "verbatim", FRAME: "zstd-frame"}
#: no chunk decodes to more than this (the ingest cuts 1 MiB chunks)
MAX_CHUNK = 256 << 20

_CHUNK = struct.Struct("<QQIIQBIB32s")
_SEAL = struct.Struct("<Q")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


class DamagedRecord(StoreError):
    """A record failed its checksum or its structural checks: the store is damaged there."""


def u64key(n: int) -> bytes:
    """Big-endian keys keep integer ids in order (LMDB appends cheaply)."""
    return n.to_bytes(8, "big")


def key_u64(k: bytes) -> int:
    return int.from_bytes(k, "big")


def _digest(table: str, key: bytes, value: bytes | memoryview) -> int:
    h = xxhash.xxh3_64(table.encode())
    h.update(b"\0")
    h.update(key)
    h.update(b"\0")
    h.update(value)
    return h.intdigest()


def seal(table: str, key: bytes, value: bytes) -> bytes:
    """value followed by its checksum over (table, key, value)."""
    return value + _SEAL.pack(_digest(table, key, value))


def unseal(table: str, key: bytes, raw: bytes | memoryview) -> bytes:
    """The value of a sealed record; DamagedRecord when its checksum does not match."""
    raw = memoryview(raw)
    if len(raw) < _SEAL.size:
        raise DamagedRecord(f"{table} record {key.hex()[:32]} is damaged (too short)")
    value = raw[:-_SEAL.size]
    if _SEAL.unpack(raw[-_SEAL.size:])[0] != _digest(table, key, value):
        raise DamagedRecord(f"{table} record {key.hex()[:32]} is damaged (checksum mismatch)")
    return bytes(value)


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
            rec = cls(*_CHUNK.unpack(bytes(data)))
        except struct.error:
            raise DamagedRecord(f"chunk record of {len(data)} bytes is malformed") from None
        delta = rec.kind in (DELTA_XOR, DELTA_SUB)
        if (rec.kind not in KIND_NAMES or rec.base_xform not in widen.FACTOR or delta != bool(rec.base)
                or not 0 < rec.raw_len <= MAX_CHUNK or rec.stored_len == 0
                or (not delta and (rec.base_off or rec.base_xform))
                or (rec.kind == VERBATIM and rec.stored_len != rec.raw_len)):
            raise DamagedRecord("chunk record is malformed (kind, base or lengths out of range)")
        return rec


@dataclass
class TensorEntry:
    """Where one tensor sits in a file (for ls, base matching and tensor-aware prefetch)."""

    name: str
    dtype: str
    shape: list[int]
    start: int
    end: int
    #: blake3 over the tensor's chunk hashes: equal tensors have equal digests ("" for a tensor
    #: chunked together with its neighbours in a run of tiny ones)
    digest: str


@dataclass
class FileRecord:
    """The content of one stored file version: size, sha256, extents covering [0, size) in order.

    Immutable once written; an inode points at it. Mode, owner and times belong to the inode.
    """

    size: int
    sha256: str
    kind: str  # "safetensors" or "opaque"
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

    def pack(self) -> bytes:
        head = {
            "size": self.size, "sha256": self.sha256, "kind": self.kind, "n": len(self.chunk_ids),
            "note": self.note, "new_bytes": self.new_bytes, "reused_chunks": self.reused_chunks,
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
            if len(data) != 4 + n + 16 * count:
                raise ValueError("length")
            arrays = np.frombuffer(data, dtype="<u8", count=2 * count, offset=4 + n)
            rec = cls(
                size=head["size"], sha256=head["sha256"], kind=head["kind"],
                offsets=arrays[:count].astype(np.uint64), chunk_ids=arrays[count:].astype(np.uint64),
                tensors=[TensorEntry(*t) for t in head["tensors"]], note=head.get("note", ""),
                new_bytes=head.get("new_bytes", 0), reused_chunks=head.get("reused_chunks", 0),
            )
        except (struct.error, ValueError, KeyError, TypeError, json.JSONDecodeError):
            raise DamagedRecord("file record is malformed") from None
        rec.check()
        return rec

    def check(self) -> None:
        """Structural checks: extents cover exactly [0, size) in order, fields have their types."""
        ok = (isinstance(self.size, int) and self.size >= 0 and isinstance(self.sha256, str)
              and _SHA256.match(self.sha256) is not None and isinstance(self.kind, str))
        offs = self.offsets
        if ok and len(offs):
            ok = (int(offs[0]) == 0 and int(offs[-1]) < self.size and bool(np.all(offs[1:] > offs[:-1]))
                  and bool(np.all(self.chunk_ids != 0)))
        elif ok:
            ok = self.size == 0
        if ok:
            ok = all(isinstance(t.start, int) and isinstance(t.end, int) and isinstance(t.name, str)
                     and 0 <= t.start <= t.end <= self.size for t in self.tensors)
        if not ok:
            raise DamagedRecord("file record is malformed (its extents do not cover the file)")
