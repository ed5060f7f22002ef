"""The bucket's format: a contract between machines. Pure encode/decode, strict checks, no I/O.

    packs/<P>              chunk payloads back to back; P = blake3 (hex) of the object's bytes
    index/<P>              what pack P holds: one entry per chunk (below); written after the pack
    files/<F>              a file manifest: size, sha256, extents, and the entry of every chunk it
                           reads, bases included, so a reader needs nothing else; F = blake3 of it
    models/<name>/<V>      a model manifest version: the model's entries (files by manifest key,
                           directories, links); V = 19-digit time in ns, '-', the writer's id.
                           The newest V of a name wins; older ones stay until gc.

Every object is immutable and written once (If-None-Match: *), so writers never conflict. A
model appears when its manifest version is written, after everything it references. Index,
file and model objects are zstd-compressed JSON with a "format" number; a reader refuses a
format it does not know and any field out of range, so a damaged or hostile object is an
error naming it, never a wrong file. A chunk entry is a list:

    [hash, pack, offset, length, payload_xxh3, kind, checksum, raw_len, base_hash, base_off, base_xform]

hash is the blake3 of the chunk's decoded bytes (its content address), payload_xxh3 checks the
fetched payload before anything decodes it, checksum (xxh3-64 of the decoded bytes) checks the
result; a delta names its base by hash, and the base's own entry is standalone.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

import zstandard

from zipfs.codec import widen
from zipfs.errors import ZipfsError
from zipfs.remote.config import RemoteError
from zipfs.store import names
from zipfs.store.records import DELTA_SUB, DELTA_XOR, KIND_NAMES, MAX_CHUNK, VERBATIM, ChunkRecord

FORMAT = 1
PACKS, INDEX, FILES, MODELS = "packs/", "index/", "files/", "models/"
#: a JSON object larger than this when decompressed is refused (a bomb, not a manifest)
MAX_OBJECT = 256 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_VERSION = re.compile(r"[0-9]{19}-[0-9a-f]{16}\Z")
_U64, _U32, _I63 = (1 << 64) - 1, (1 << 32) - 1, (1 << 63) - 1


@dataclass(frozen=True)
class Entry:
    """Where one chunk's payload lies in the bucket and how it decodes."""

    hash: str
    pack: str
    off: int
    length: int
    pcheck: int
    kind: int
    checksum: int
    raw_len: int
    base: str = ""
    base_off: int = 0
    base_xform: int = 0

    def row(self) -> list:
        return [self.hash, self.pack, self.off, self.length, self.pcheck, self.kind, self.checksum,
                self.raw_len, self.base, self.base_off, self.base_xform]

    @classmethod
    def from_row(cls, row: object, where: str) -> Entry:
        if not isinstance(row, list) or len(row) != 11:
            raise RemoteError(f"{where}: a chunk entry is malformed")
        try:
            e = cls(*row)  # type: ignore[misc]
        except TypeError:
            raise RemoteError(f"{where}: a chunk entry is malformed") from None
        e.check(where)
        return e

    def check(self, where: str) -> None:
        ints = (self.off, self.length, self.pcheck, self.kind, self.checksum, self.raw_len, self.base_off,
                self.base_xform)
        delta = self.kind in (DELTA_XOR, DELTA_SUB)
        ok = (all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _U64 for v in ints)
              and isinstance(self.hash, str) and _HEX64.match(self.hash) is not None
              and isinstance(self.pack, str) and _HEX64.match(self.pack) is not None
              and isinstance(self.base, str) and (_HEX64.match(self.base) is not None) == delta
              and self.kind in KIND_NAMES and self.base_xform in widen.FACTOR
              and 0 < self.raw_len <= MAX_CHUNK and 0 < self.length <= 2 * MAX_CHUNK
              and (delta or not (self.base_off or self.base_xform))
              and (self.kind != VERBATIM or self.length == self.raw_len))
        if not ok:
            raise RemoteError(f"{where}: a chunk entry is malformed")

    def record(self, base_id: int) -> ChunkRecord:
        """The local chunk record of this entry (base_id: the local id of its base, or 0)."""
        return ChunkRecord(self.checksum, base_id, self.raw_len, self.length, 0, self.kind, self.base_off,
                           self.base_xform, bytes.fromhex(self.hash))

    @classmethod
    def of(cls, rec: ChunkRecord, base_hash: bytes, pack: str, off: int, pcheck: int) -> Entry:
        return cls(rec.hash.hex(), pack, off, rec.stored_len, pcheck, rec.kind, rec.checksum, rec.raw_len,
                   base_hash.hex(), rec.base_off, rec.base_xform)


# ---- objects: zstd JSON with a format number ----

def encode(obj: dict) -> bytes:
    obj = {"format": FORMAT, **obj}
    return zstandard.ZstdCompressor(level=3).compress(json.dumps(obj, separators=(",", ":")).encode())


def decode(data: bytes, where: str) -> dict:
    try:
        # read through a stream with a cap: a frame's own content size is not to be trusted
        # (zstandard's one-shot decompress allocates what the header says)
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            raw = r.read(MAX_OBJECT + 1)
            while len(raw) <= MAX_OBJECT and (more := r.read(MAX_OBJECT + 1 - len(raw))):
                raw += more
        if len(raw) > MAX_OBJECT:
            raise ValueError("too large")
        obj = json.loads(raw)
    except (zstandard.ZstdError, ValueError, RecursionError, MemoryError):
        raise RemoteError(f"{where} is damaged (not a zipfs object)") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise RemoteError(f"{where}: format {obj.get('format') if isinstance(obj, dict) else '?'} is not "
                          f"one this zipfs reads ({FORMAT}); upgrade zipfs")
    return obj


def _field(obj: dict, name: str, kind: type | tuple[type, ...], where: str):
    v = obj.get(name)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise RemoteError(f"{where}: field {name!r} is missing or malformed")
    return v


# ---- pack indexes ----

def index_object(pack: str, size: int, entries: list[Entry]) -> bytes:
    return encode({"pack": pack, "size": size, "chunks": [e.row() for e in entries]})


def parse_index(data: bytes, key: str) -> list[Entry]:
    obj = decode(data, key)
    pack, size = _field(obj, "pack", str, key), _field(obj, "size", int, key)
    if key != INDEX + pack:
        raise RemoteError(f"{key}: it describes pack {pack[:16]}, not its own")
    out = [Entry.from_row(r, key) for r in _field(obj, "chunks", list, key)]
    if any(e.pack != pack or e.off + e.length > size for e in out):
        raise RemoteError(f"{key}: a chunk entry lies outside its pack")
    return out


# ---- file manifests ----

@dataclass
class FileManifest:
    size: int
    sha256: str
    kind: str
    note: str
    tensors: list
    offsets: list[int]
    #: the chunk entry (an index into chunks) of each extent
    refs: list[int]
    chunks: list[Entry]

    def encode(self) -> bytes:
        return encode({"size": self.size, "sha256": self.sha256, "kind": self.kind, "note": self.note,
                       "tensors": self.tensors, "offsets": self.offsets, "refs": self.refs,
                       "chunks": [e.row() for e in self.chunks]})

    @classmethod
    def parse(cls, data: bytes, key: str) -> FileManifest:
        obj = decode(data, key)
        m = cls(_field(obj, "size", int, key), _field(obj, "sha256", str, key), _field(obj, "kind", str, key),
                _field(obj, "note", str, key), _field(obj, "tensors", list, key),
                _field(obj, "offsets", list, key), _field(obj, "refs", list, key),
                [Entry.from_row(r, key) for r in _field(obj, "chunks", list, key)])
        by_hash = {e.hash: e for e in m.chunks}
        if (len(m.offsets) != len(m.refs)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(m.chunks)
                           for i in m.refs)
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in m.offsets)):
            raise RemoteError(f"{key}: its extents are malformed")
        for e in m.chunks:  # delta depth one: a delta's base is in the manifest, standalone
            if e.base and (e.base not in by_hash or by_hash[e.base].base):
                raise RemoteError(f"{key}: chunk {e.hash[:16]} is a delta of a base the manifest lacks")
        return m


# ---- model manifests ----

ENTRY_TYPES = ("file", "dir", "link")


@dataclass
class ModelManifest:
    name: str
    writer: str
    created_ns: int
    base: str
    reason: str
    #: {"path", "type", "mode", "uid", "gid", "mtime_ns", and "file" + "size" or "target"}
    entries: list[dict]
    #: a removal: the name shows nothing from this version on
    deleted: bool = False

    def encode(self) -> bytes:
        return encode({"name": self.name, "writer": self.writer, "created_ns": self.created_ns,
                       "base": self.base, "reason": self.reason, "entries": self.entries,
                       "deleted": self.deleted})

    @classmethod
    def parse(cls, data: bytes, key: str) -> ModelManifest:
        obj = decode(data, key)
        m = cls(_field(obj, "name", str, key), _field(obj, "writer", str, key),
                _field(obj, "created_ns", int, key), _field(obj, "base", str, key),
                _field(obj, "reason", str, key), _field(obj, "entries", list, key),
                _field(obj, "deleted", bool, key))
        if m.deleted and m.entries:
            raise RemoteError(f"{key}: a removal with entries")
        if model_prefix(m.name) != key[:key.rfind("/") + 1]:
            raise RemoteError(f"{key}: it names model {m.name!r}, not the one its key does")
        for e in m.entries:
            if not isinstance(e, dict) or e.get("type") not in ENTRY_TYPES:
                raise RemoteError(f"{key}: an entry is malformed")
            where = f"{key}: entry {str(e.get('path'))[:80]!r}"
            path = _field(e, "path", str, where)
            try:
                clean = not path or names.normalize(path) == path
            except ZipfsError:
                clean = False
            if not clean:
                raise RemoteError(f"{where}: not a clean relative path")
            for f, top in (("mode", _U32), ("uid", _U32), ("gid", _U32), ("mtime_ns", _I63)):
                if not 0 <= _field(e, f, int, where) <= top:
                    raise RemoteError(f"{where}: field {f!r} is out of range")
            if e["type"] == "file":
                if not _HEX64.match(_field(e, "file", str, where)) or _field(e, "size", int, where) < 0:
                    raise RemoteError(f"{where}: its file manifest key is malformed")
            elif e["type"] == "link":
                _check_target(path, _field(e, "target", str, where), where)
        return m


def _check_target(path: str, target: str, where: str) -> None:
    """A link stays inside its model: relative, and not climbing above the model's top (a hub
    snapshot's ../../blobs/x stays inside its repo folder)."""
    inside = posixpath.normpath(posixpath.join(posixpath.dirname(path), target)) if target else ".."
    if (target.startswith("/") or "\0" in target or len(target.encode("utf-8", "surrogateescape")) > 4095
            or inside == ".." or inside.startswith("../")):
        raise RemoteError(f"{where}: its link target {target[:80]!r} leads outside the model")


def is_name(text: str) -> bool:
    """Whether text is a content address as packs, indexes and file manifests are named."""
    return _HEX64.match(text) is not None


def model_prefix(name: str) -> str:
    """models/<name>/ with the name (a store path such as org/model) as one key component."""
    return MODELS + quote(names.normalize(name), safe="") + "/"


def model_of(key: str) -> tuple[str, str] | None:
    """(model name, version) of a manifest key, or None for a key that is not one."""
    if not key.startswith(MODELS):
        return None
    parts = key[len(MODELS):].split("/")
    if len(parts) != 2 or not _VERSION.match(parts[1]):
        return None
    try:
        name = unquote(parts[0], errors="strict")
        if not name or names.normalize(name) != name or quote(name, safe="") != parts[0]:
            return None  # one spelling per name: readers ask for the canonical key
    except (UnicodeDecodeError, ZipfsError):
        return None
    return name, parts[1]


def new_version(writer: str) -> str:
    return f"{time.time_ns():019d}-{writer}"


def version_ns(version: str) -> int:
    return int(version[:19])
