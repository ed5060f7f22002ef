"""Garbage collection and checks across every machine that shares the bucket.

The live set is read from the manifests themselves, never from one machine's store. Nothing
younger than the grace period is deleted: a pack another machine is uploading now has no
manifest yet (JuiceFS lost data exactly where gc raced uploads). A pack is deleted in two steps,
a grace period apart: first its index is moved to trash/ (pushes stop reusing its chunks, and a
push that reused them before checks the index is still there before it publishes), then,
unless a manifest written meanwhile reads it (its index is then put back), the pack goes.
Repack: the live chunks of a pack that is mostly dead are copied into a new pack, and the old
one condemned; readers whose manifest names the old pack find the chunk through the indexes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import xxhash

from zipfs.errors import ZipfsError
from zipfs.remote import layout
from zipfs.remote.client import Bucket, Listed
from zipfs.remote.config import RemoteError
from zipfs.remote.layout import FILES, INDEX, MODELS, PACKS, Entry, FileManifest, ModelManifest

TRASH = "trash/"
DEFAULT_GRACE = 3600.0
#: a pack whose live bytes are below this fraction of it is repacked
REPACK_BELOW = 0.5
READERS = 8


@dataclass
class RemoteGcResult:
    versions: int = 0
    files: int = 0
    condemned: int = 0
    restored: int = 0
    packs: int = 0
    repacked: int = 0
    freed_bytes: int = 0
    young: int = 0


@dataclass
class Bucketview:
    """One listing of the bucket, by area, and what its manifests and indexes say."""

    objects: dict[str, dict[str, Listed]]
    #: model name -> its manifest versions, oldest first
    versions: dict[str, list[str]] = field(default_factory=dict)
    manifests: dict[str, ModelManifest] = field(default_factory=dict)
    files: dict[str, FileManifest] = field(default_factory=dict)
    #: pack -> entries, from index/ (indexed) and trash/ (condemned)
    indexed: dict[str, list[Entry]] = field(default_factory=dict)
    condemned: dict[str, list[Entry]] = field(default_factory=dict)


def _list(bucket: Bucket) -> dict[str, dict[str, Listed]]:
    out: dict[str, dict[str, Listed]] = {a: {} for a in (PACKS, INDEX, TRASH, FILES, MODELS)}
    for area in out:
        for o in bucket.list(area):
            out[area][o.key[len(area):]] = o
    return out


def read_view(bucket: Bucket, all_versions: bool = True) -> Bucketview:
    """List the bucket and read its manifests (every version, or the newest of each name) and
    indexes. Anything damaged is an error: gc never deletes on a guess."""
    view = Bucketview(_list(bucket))
    for rest in view.objects[MODELS]:
        found = layout.model_of(MODELS + rest)
        if found is not None:
            view.versions.setdefault(found[0], []).append(found[1])
    for v in view.versions.values():
        v.sort()
    keys = [layout.model_prefix(n) + v for n, vs in view.versions.items()
            for v in (vs if all_versions else vs[-1:])]

    def model(key: str) -> ModelManifest:
        return ModelManifest.parse(bucket.get(key), key)

    with ThreadPoolExecutor(READERS) as pool:
        view.manifests = dict(zip(keys, pool.map(model, keys), strict=True))
        fkeys = sorted({e["file"] for m in view.manifests.values() for e in m.entries if e["type"] == "file"})

        def fman(k: str) -> FileManifest:
            return FileManifest.parse(bucket.get(FILES + k), FILES + k)

        view.files = dict(zip(fkeys, pool.map(fman, fkeys), strict=True))
        for area, into in ((INDEX, view.indexed), (TRASH, view.condemned)):
            names = [n for n in view.objects[area] if layout.is_name(n)]

            def index(n: str, area: str = area) -> list[Entry]:
                return layout.parse_index(bucket.get(area + n), INDEX + n)

            into.update(zip(names, pool.map(index, names), strict=True))
    return view


def _live(view: Bucketview, manifests: list[str]) -> tuple[set[str], set[tuple[str, int]]]:
    """The file manifests and the chunk payloads (hash, payload xxh3) these manifests read."""
    files = {e["file"] for k in manifests for e in view.manifests[k].entries if e["type"] == "file"}
    chunks = {(c.hash, c.pcheck) for f in files for c in view.files[f].chunks}
    return files, chunks


def gc_remote(bucket: Bucket, grace: float = DEFAULT_GRACE, repack_below: float = REPACK_BELOW,
              now: float | None = None) -> RemoteGcResult:
    """Delete what no manifest version that is the newest of its name (or younger than grace)
    reads, once older than grace; condemn and then delete dead packs; repack mostly dead ones."""
    now = time.time() if now is None else now
    old = now - grace
    res = RemoteGcResult()
    view = read_view(bucket)

    def is_old(area: str, name: str) -> bool:
        """Older than the grace period, in the listing and still now (a writer may have
        rewritten it since, to keep it: Bucket.refresh); else kept, and counted as such."""
        o = view.objects[area].get(name)
        if o is None or o.modified.timestamp() > old:
            res.young += 1
            return False
        now_at = bucket.modified(area + name)
        if now_at is None or now_at.timestamp() > old:
            res.young += now_at is not None
            return False
        return True

    kept = []
    for name, versions in view.versions.items():
        for v in versions:
            key = layout.model_prefix(name) + v
            if v == versions[-1] or not is_old(MODELS, key[len(MODELS):]):
                kept.append(key)
            else:
                bucket.delete(key)
                res.versions += 1
    live_files, live = _live(view, kept)
    for f in view.objects[FILES]:
        if f not in live_files and is_old(FILES, f):
            bucket.delete(FILES + f)
            res.files += 1
    holders: dict[tuple[str, int], set[str]] = defaultdict(set)
    for pack, entries in view.indexed.items():
        for e in entries:
            holders[(e.hash, e.pcheck)].add(pack)
    condemned_now: set[str] = set()
    for pack, entries in view.indexed.items():
        size = view.objects[PACKS][pack].size if pack in view.objects[PACKS] else 0
        alive = [e for e in entries if (e.hash, e.pcheck) in live]
        if alive and sum(e.length for e in alive) >= repack_below * size or not is_old(INDEX, pack):
            continue
        condemned_now.add(pack)
        if not alive:
            _condemn(bucket, pack, entries)
            res.condemned += 1
        else:
            sole = [e for e in alive if holders[(e.hash, e.pcheck)] == {pack}]
            if sole:
                _repack(bucket, pack, sole)
            for e in alive:
                holders[(e.hash, e.pcheck)].discard(pack)
            _condemn(bucket, pack, entries)
            res.repacked += 1
    for pack, entries in view.condemned.items():
        if pack in view.indexed:  # indexed again since (the same bytes pushed again): trash is stale
            if pack not in condemned_now:
                bucket.delete(TRASH + pack)
            continue
        needed = [e for e in entries if (e.hash, e.pcheck) in live and not holders.get((e.hash, e.pcheck))]
        if needed and pack in view.objects[PACKS]:  # a manifest written since reads it: index it again
            bucket.put(INDEX + pack, layout.index_object(pack, view.objects[PACKS][pack].size, entries))
            bucket.delete(TRASH + pack)
            res.restored += 1
        elif needed:
            continue  # read by a manifest, and gone: fsck --remote says so; nothing to delete
        elif is_old(TRASH, pack) and _unindexed(bucket, pack):
            res.freed_bytes += view.objects[PACKS][pack].size if pack in view.objects[PACKS] else 0
            bucket.delete(PACKS + pack)
            bucket.delete(TRASH + pack)
            res.packs += 1
    for pack, o in view.objects[PACKS].items():  # uploads that never got an index
        if (pack not in view.indexed and pack not in view.condemned and is_old(PACKS, pack)
                and _unindexed(bucket, pack)):
            bucket.delete(PACKS + pack)
            res.freed_bytes += o.size
            res.packs += 1
    return res


def _unindexed(bucket: Bucket, pack: str) -> bool:
    """No index names the pack now (a push may have indexed it since the listing)."""
    return not bucket.exists(INDEX + pack)


def _condemn(bucket: Bucket, pack: str, entries: list[Entry]) -> None:
    size = max((e.off + e.length for e in entries), default=0)
    bucket.put(TRASH + pack, layout.index_object(pack, size, entries))
    bucket.delete(INDEX + pack)


def _repack(bucket: Bucket, pack: str, entries: list[Entry]) -> None:
    """Copy these entries' payloads into a new pack (checked on the way), indexed."""
    buf, rows = bytearray(), []
    for e in sorted(entries, key=lambda e: bool(e.base)):
        data = bucket.get_range(PACKS + pack, e.off, e.length)
        if xxhash.xxh3_64_intdigest(data) != e.pcheck:
            raise RemoteError(f"{PACKS}{pack}: chunk {e.hash[:16]} does not match its checksum; run "
                              "zipfs fsck --remote")
        rows.append((e, len(buf)))
        buf += data
    name = blake3.blake3(bytes(buf)).hexdigest()
    moved = [Entry(e.hash, name, off, e.length, e.pcheck, e.kind, e.checksum, e.raw_len, e.base, e.base_off,
                   e.base_xform) for e, off in rows]
    bucket.put(PACKS + name, bytes(buf), create=True)
    bucket.put(INDEX + name, layout.index_object(name, len(buf), moved), create=True)


@dataclass
class RemoteFsckResult:
    models: int = 0
    files: int = 0
    chunks: int = 0
    packs: int = 0
    scrubbed: int = 0
    problems: list[str] = field(default_factory=list)


def fsck_remote(bucket: Bucket, scrub: bool = False) -> RemoteFsckResult:
    """Every manifest version parses, every file manifest it names exists, every chunk a newest
    version reads lies inside a pack that exists and is indexed; --scrub fetches each of those
    payloads and checks it against its checksum."""
    res = RemoteFsckResult()
    try:
        view = read_view(bucket)
    except ZipfsError as e:
        res.problems.append(str(e))
        return res
    res.models, res.files, res.packs = len(view.versions), len(view.files), len(view.objects[PACKS])
    newest = [layout.model_prefix(n) + vs[-1] for n, vs in view.versions.items()]
    held = {(e.hash, e.pcheck) for es in view.indexed.values() for e in es}
    seen: set[tuple[str, int]] = set()
    for key in newest:
        for fe in (e for e in view.manifests[key].entries if e["type"] == "file"):
            fm = view.files[fe["file"]]
            if fm.size != fe["size"]:
                res.problems.append(f"{key}: {fe['path']} is {fe['size']} bytes, its manifest says {fm.size}")
            for c in fm.chunks:
                if (c.hash, c.pcheck) in seen:
                    continue
                seen.add((c.hash, c.pcheck))
                res.chunks += 1
                pack = view.objects[PACKS].get(c.pack)
                if pack is None or c.pack not in view.indexed:
                    if (c.hash, c.pcheck) not in held:
                        res.problems.append(f"{key}: chunk {c.hash[:16]} of {fe['path']} is in no "
                                            "indexed pack")
                elif c.off + c.length > pack.size:
                    res.problems.append(f"{key}: chunk {c.hash[:16]} lies past the end of pack {c.pack[:16]}")
                elif scrub:
                    data = bucket.get_range(PACKS + c.pack, c.off, c.length)
                    res.scrubbed += 1
                    if xxhash.xxh3_64_intdigest(data) != c.pcheck:
                        res.problems.append(f"pack {c.pack[:16]}: chunk {c.hash[:16]} does not match its "
                                            "checksum")
    for pack in view.indexed:
        if pack not in view.objects[PACKS]:
            res.problems.append(f"{INDEX}{pack[:16]}… indexes a pack that is missing")
    return res
