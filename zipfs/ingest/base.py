"""Find the base model of a model being ingested, and map its tensors to the base's chunks.

Order (ZipLLM/BitX idea, with a guard against false matches):
1. `--base NAME` forces a base, `--no-delta` disables deltas;
2. metadata hints (config.json `_name_or_path`, README model card `base_model:`, adapter_config
   `base_model_name_or_path`) naming a model in the store;
3. otherwise every stored model with matching tensor names, dtypes and shapes is scored by trial
   delta coding of a few sampled chunks against standalone coding.
A candidate, hinted or not, is only used when its sampled deltas are clearly smaller than standalone
coding: an unrelated model of the same architecture gains ~1% and must never be picked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from zipfs.codec import widen
from zipfs.errors import CorruptChunkError, ZipfsError
from zipfs.formats import safetensors as st
from zipfs.ingest import encoding, hubcache
from zipfs.ingest.plan import DEFAULT_CHUNK, chunk_ranges, open_regular, plan_fd, read_text_inside
from zipfs.read.chunks import ChunkSource
from zipfs.store import hub, inodes
from zipfs.store import models as models_mod
from zipfs.store.lmdb_store import Store

#: a base is used only when sampled deltas are at most this fraction of standalone coding
MAX_DELTA_RATIO = 0.85
#: chunks sampled per candidate
SAMPLES = 12
#: a candidate must share at least this fraction of the new model's tensor bytes
MIN_OVERLAP = 0.5


@dataclass(frozen=True)
class BaseTensor:
    dtype: str
    shape: tuple[int, ...]
    chunk_ids: tuple[int, ...]


@dataclass(frozen=True)
class BaseRef:
    """What one new chunk is coded against: bytes [off, ...) of a base chunk, widened by xform."""

    chunk_id: int
    off: int = 0
    xform: int = widen.NONE


class Resolved(NamedTuple):
    """The base a new chunk is coded against, and its bytes."""

    ref: BaseRef
    raw: bytes | memoryview
    #: bytes the base chunk's own coding takes for as many bytes as the new chunk (None when it
    #: is widened from another dtype): a fine-tune's chunk codes standalone to about this, so a
    #: delta clearly below it need not be compared with a standalone coding
    plain_hint: float | None


def resolve_base(store: Store, source: ChunkSource, ref: BaseRef, nbytes: int) -> Resolved | None:
    """The standalone chunk and bytes a new chunk of nbytes is coded against, or None.

    Delta depth one: when the base chunk is itself a delta, code against its own base (the same
    elements, so the offset and widening carry over), unless this ref already slices or widens.
    """
    with store.read() as txn:
        brec = store.chunk(txn, ref.chunk_id)
        if brec.base:
            if ref.off or ref.xform:
                return None
            ref = BaseRef(brec.base, brec.base_off, brec.base_xform)
            brec = store.chunk(txn, ref.chunk_id)
    try:
        raw = source.base_bytes(ref.chunk_id, ref.off, ref.xform, nbytes)
    except CorruptChunkError:
        return None
    if len(raw) != nbytes:
        return None
    hint = brec.stored_len * nbytes / brec.raw_len if not ref.xform else None  # (raw_len > 0: unpack checks)
    return Resolved(ref, raw, hint)


@dataclass
class BaseChoice:
    """The chosen base (or none) and why: shown by ingest, kept in the model record."""

    name: str | None
    reason: str
    ratio: float | None = None
    index: dict[str, BaseTensor] = field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK

    def lookup(self, seg: st.Segment) -> list[BaseRef] | None:
        """A base ref per chunk of a tensor segment (fewer when the base is shorter), or None.

        Pairs need the same tensor name and trailing dims, and the same dtype or an exact widening
        (BF16 base, F32 fine-tune). A tensor grown or shrunk along its first axis (embeddings
        resized for added tokens) keeps its leading rows at the same offsets, so the overlap
        pairs up and the extra rows are coded standalone.
        """
        t = seg.tensor
        b = self.index.get(t.name) if t is not None else None
        if b is None or b.shape[1:] != t.shape[1:]:
            return None
        xform = widen.widening(b.dtype, t.dtype.name)
        if xform is None:
            return None
        if xform == widen.NONE:
            return [BaseRef(cid) for cid in b.chunk_ids]
        base_width = st.DTYPES[b.dtype].width
        base_step = max(1, self.chunk_size // base_width) * base_width
        refs = []
        for s, _ in chunk_ranges(seg, self.chunk_size):
            base_pos = (s - seg.start) // t.dtype.width * base_width
            j, off = divmod(base_pos, base_step)
            if j >= len(b.chunk_ids):
                break
            refs.append(BaseRef(b.chunk_ids[j], off, xform))
        return refs


@dataclass(frozen=True)
class LocalTensor:
    path: Path
    info: st.TensorInfo


def local_tensors(files: list[tuple[Path, str]]) -> dict[str, LocalTensor]:
    """Tensors of the safetensors and GGUF files about to be ingested, by tensor name."""
    out: dict[str, LocalTensor] = {}
    for path, dest in files:
        fd = open_regular(path, path.lstat())  # links are not followed here either
        try:
            size = os.fstat(fd).st_size
            plan = plan_fd(fd, size, dest)
        finally:
            os.close(fd)
        for seg in plan.segments:
            if seg.tensor is not None:
                out[seg.tensor.name] = LocalTensor(path, seg.tensor)
    return out


#: file kinds whose tensors base detection pairs up, and the reason given when there are none
TENSOR_KINDS = ("safetensors", "gguf")
NO_TENSORS = "no safetensors or GGUF tensors"

_CARD_BASE = re.compile(r"^base_model:\s*(.*)$", re.M)


def metadata_hints(root: Path) -> list[str]:
    """Base model names a model directory declares about itself (a hub repo folder: its snapshots)."""
    dirs = [root, *(hubcache.snapshot_dirs(root) if hub.repo_of(str(root.resolve())) else [])]
    return [h for d in dirs for h in _declared(root, d)]


def _declared(root: Path, d: Path) -> list[str]:
    hints: list[str] = []
    for fname, key in (("config.json", "_name_or_path"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads(read_text_inside(root, d / fname)).get(key)
        except (ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            hints.append(value)
    card = read_text_inside(root, d / "README.md")
    if card.startswith("---"):
        front = card.split("---", 2)[1] if card.count("---") >= 2 else ""
        m = _CARD_BASE.search(front)
        if m:
            rest = front[m.end():]
            values = [m.group(1)] if m.group(1).strip() else re.findall(r"^\s*-\s*(.+)$", rest, re.M)[:4]
            hints += [v.strip().strip("'\"") for v in values if v.strip()]
    return hints


def _hint_matches(hint: str, model: str) -> bool:
    """'org/Name' matches a stored 'Name' or 'other/name': hub ids vs local names; a hub repo
    folder 'models--org--Name' by its id."""
    name = hub.repo_of(model) or model
    return hint.strip("/").rsplit("/", 1)[-1].lower() == name.strip("/").rsplit("/", 1)[-1].lower()


def stored_index(store: Store, model: str) -> dict[str, BaseTensor]:
    """Tensors of a stored model, by name, with their chunk ids."""
    out: dict[str, BaseTensor] = {}
    with store.read() as txn:
        for _, node in inodes.walk(store, txn, model):
            if node.content != inodes.STORED:
                continue
            rec = store.file(txn, node.content_id)
            if rec.kind not in TENSOR_KINDS:
                continue
            starts = rec.offsets.tolist()
            ids = rec.chunk_ids.tolist()
            pos = {s: i for i, s in enumerate(starts)}
            for t in rec.tensors:
                if t.start == t.end or t.start not in pos or not t.digest:  # no chunks of its own
                    continue
                i = pos[t.start]
                j = i
                while j < len(starts) and starts[j] < t.end:
                    j += 1
                out[t.name] = BaseTensor(t.dtype, tuple(t.shape), tuple(ids[i:j]))
    return out


def _score(store: Store, source: ChunkSource, local: dict[str, LocalTensor],
           choice: BaseChoice) -> tuple[float, float]:
    """(overlap, delta/standalone ratio on sampled chunks) of a candidate base."""
    total = sum(t.info.nbytes for t in local.values()) or 1
    pairs: list[tuple[LocalTensor, tuple[int, int], BaseRef]] = []
    matched = 0
    for lt in local.values():
        seg = st.Segment(lt.info.start, lt.info.end, lt.info.dtype, lt.info)
        refs = choice.lookup(seg)
        if not refs:
            continue
        matched += lt.info.nbytes
        pairs += zip([lt] * len(refs), chunk_ranges(seg, choice.chunk_size), refs, strict=False)
    overlap = matched / total
    if overlap < MIN_OVERLAP or not pairs:
        return overlap, 1.0
    delta_bytes = plain_bytes = 0
    for lt, (s, e), ref in pairs[::max(1, len(pairs) // SAMPLES)][:SAMPLES]:
        with open(lt.path, "rb") as f:
            f.seek(s)
            raw = f.read(e - s)
        resolved = resolve_base(store, source, ref, len(raw))
        if resolved is None:
            continue
        plain = len(encoding.plain(raw, lt.info.dtype).payload)
        delta = len(encoding.delta(raw, lt.info.dtype, resolved.raw).payload)
        plain_bytes += plain
        delta_bytes += min(delta, plain)
    return overlap, (delta_bytes / plain_bytes if plain_bytes else 1.0)


def choose_base(store: Store, model: str, files: list[tuple[Path, str]], root: Path | None,
                forced: str | None = None, disabled: bool = False, chunk_size: int = 1 << 20,
                log: Callable[[str], None] | None = None) -> BaseChoice:
    """Pick the base for `model` (about to be ingested from `files`) among stored models."""
    if disabled:
        return BaseChoice(None, "deltas disabled (--no-delta)")
    local = local_tensors(files)
    if not local:
        return BaseChoice(None, NO_TENSORS)
    with store.read() as txn:
        models = models_mod.named(store, txn)
    models.pop(model, None)
    if forced is not None:
        if forced not in models and hub.folder(forced) in models:  # a path first, then a hub id
            forced = hub.folder(forced)
        if forced not in models:
            raise ZipfsError(f"--base {forced}: no such model in the store")
        groups = [("--base", [forced])]
    else:
        hints = metadata_hints(root) if root else []
        # oldest first: among equal candidates (a model and its byte-identical copy) the original wins
        order = sorted(models, key=lambda m: models[m].ingested)
        hinted = [m for m in order if any(_hint_matches(h, m) for h in hints)]
        groups = [("metadata hint", hinted), ("sampled delta coding", [m for m in order if m not in hinted])]
    source = ChunkSource(store)
    best: BaseChoice | None = None
    for how, group in groups:
        for m in group:
            cand = BaseChoice(m, "", index=stored_index(store, m), chunk_size=chunk_size)
            overlap, ratio = _score(store, source, local, cand)
            if log:
                log(f"  base candidate {m}: {overlap:.0%} of tensor bytes match, "
                    f"sampled delta ratio {ratio:.3f}")
            good = overlap > 0 if forced else overlap >= MIN_OVERLAP and ratio <= MAX_DELTA_RATIO
            if good and (best is None or ratio < best.ratio):
                cand.reason, cand.ratio = f"{how}; sampled deltas {ratio:.3f} of standalone", ratio
                best = cand
        if best is not None:  # a hinted base that pays is taken without scanning the rest
            return best
    if forced:
        raise ZipfsError(f"--base {forced}: no tensor matches by name, dtype and shape")
    return BaseChoice(None, "no stored model is close enough" if models else "no stored models")
